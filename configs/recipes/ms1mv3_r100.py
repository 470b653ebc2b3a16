r"""MS1MV3, IResNet-100, ArcFace (s=64, m=0.5): insightface's ``ms1mv3_r100`` recipe.

  python train.py --config configs/recipes/ms1mv3_r100.py:/data/ms1m-retinaface-t1 \
      --workdir /runs/ms1mv3_r100

MS1MV3 (5,179,510 images of 93,431 identities) for 20 epochs of global batches of 1,024
(101,160 steps); SGD lr 0.1, weight decay 5e-4, no warm-up, polynomial decay; the class centres
sharded over all devices. insightface reports IJB-C TAR@FAR=1e-4 96.85 and LFW ~99.8. See
:mod:`margins.recipes` for the shared settings.

On several hosts, start the same command on every one: under SLURM as it is (``srun``), on a
Cloud TPU pod with ``--multihost``, elsewhere with ``--coordinator_address=<host 0>:<port>
--num_processes=<N> --process_id=<i>`` (README, "Multi-host").
``...:/data/ms1m-retinaface-t1,quick`` is a smoke run of the same recipe (1-3 minutes on a
2-core CPU).
"""

from margins import recipes


def get_config(arg=None):
  return recipes.arcface_torch(arg, dataset="ms1mv3", model="iresnet100",
                               loss=dict(name="arcface", scale=64.0, margin=0.5,
                                         detach_margin=False),
                               weight_decay=5e-4, num_epochs=20)
