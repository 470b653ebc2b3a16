r"""SphereFace2 (Wen et al., ICLR 2022) on the digits: a binary classifier per class, SphereFace2-C
with the paper's r 40, m 0.4, t 3 and lambda 0.7; the learnt bias starts at ``sphereface2_bias``.

  python train.py --config configs/digits_sphereface2.py --workdir /tmp/digits_sphereface2
"""

from margins import train_lib


def get_config(arg=None):
  config = train_lib.default_config()
  config.loss = dict(name="sphereface2", scale=40.0, margin=0.4, t=3.0, alpha=0.7)
  return train_lib.quick(config) if train_lib.is_quick(arg) else config
