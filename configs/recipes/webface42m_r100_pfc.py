r"""WebFace42M, IResNet-100, CosFace (s=64, m=0.4), Partial FC 0.2: insightface's wf42m_pfc02_r100.

  python train.py --config configs/recipes/webface42m_r100_pfc.py:/data/WebFace42M \
      --workdir /runs/webface42m_r100_pfc

WebFace42M (42,474,557 images of 2,059,906 identities) for 20 epochs of global batches of 1,024
(829,580 steps); SGD lr 0.1, weight decay 5e-4, no warm-up, polynomial decay. The class centres
``W [2059906, 512]`` are sharded over all devices and each step scores the batch's own classes
plus random negatives, 20% of each device's centres (Partial FC, sample rate 0.2); unsampled
centres still move with their momentum and decay, as in insightface's Partial FC v2.
insightface reports IJB-C TAR@FAR=1e-4 97.70 (8 GPUs; 97.80-97.83 on 16-32). Evaluates and
saves every 10,000 steps. See :mod:`margins.recipes` for the shared settings.

On several hosts, start the same command on every one: under SLURM as it is (``srun``), on a
Cloud TPU pod with ``--multihost``, elsewhere with ``--coordinator_address=<host 0>:<port>
--num_processes=<N> --process_id=<i>`` (README, "Multi-host"); with more devices keep 1,024
(insightface's 8-GPU recipe) or raise ``--config.batch_size`` with the learning rate.
``...:/data/WebFace42M,quick`` is a smoke run of the same recipe (1-3 minutes on a 2-core CPU).
"""

from margins import recipes


def get_config(arg=None):
  return recipes.arcface_torch(arg, dataset="webface42m", model="iresnet100",
                               loss=dict(name="cosface", scale=64.0, margin=0.4),
                               weight_decay=5e-4, num_epochs=20, sample_rate=0.2,
                               eval_every=10_000)
