r"""SphereFace (A-Softmax, Liu et al., CVPR 2017) on the digits, margin 4, annealed.

  python train.py --config configs/digits_sphereface.py --workdir /tmp/digits_sphereface

Without the annealing ``lambda = max(5, 1000 (1 + 0.12 t)^-1)`` A-Softmax does not train.
"""

from margins import train_lib


def get_config(arg=None):
  config = train_lib.default_config()
  config.loss = dict(name="sphereface", margin=4,
                     lambda_schedule=dict(base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0))
  return train_lib.quick(config) if train_lib.is_quick(arg) else config
