r"""NormFace (Wang et al., ACM MM 2017) on the digits: scale 16, no margin.

  python train.py --config configs/digits_normface.py --workdir /tmp/digits_normface
"""

from margins import train_lib


def get_config(arg=None):
  config = train_lib.default_config()
  config.loss = dict(name="normface", scale=16.0)
  return train_lib.quick(config) if train_lib.is_quick(arg) else config
