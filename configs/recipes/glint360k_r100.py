r"""Glint360K, IResNet-100, CosFace (s=64, m=0.4): insightface's ``glint360k_r100`` recipe.

  python train.py --config configs/recipes/glint360k_r100.py:/data/glint360k \
      --workdir /runs/glint360k_r100

Glint360K (17,091,657 images of 360,232 identities) for 20 epochs of global batches of 1,024
(333,820 steps); SGD lr 0.1, weight decay 1e-4 (insightface's value for this recipe), no warm-up,
polynomial decay; the class centres ``W [360232, 512]`` sharded over all devices (model-parallel
FC). insightface reports IJB-C TAR@FAR=1e-4 97.55. See :mod:`margins.recipes` for the shared
settings.

On several hosts, start the same command on every one: under SLURM as it is (``srun``), on a
Cloud TPU pod with ``--multihost``, elsewhere with ``--coordinator_address=<host 0>:<port>
--num_processes=<N> --process_id=<i>`` (README, "Multi-host"). ``...:/data/glint360k,quick`` is a
smoke run of the same recipe (1-3 minutes on a 2-core CPU).
"""

from margins import recipes


def get_config(arg=None):
  return recipes.arcface_torch(arg, dataset="glint360k", model="iresnet100",
                               loss=dict(name="cosface", scale=64.0, margin=0.4),
                               weight_decay=1e-4, num_epochs=20)
