r"""CosFace / AM-Softmax (Wang et al., CVPR 2018) on the digits: scale 16, margin 0.35.

  python train.py --config configs/digits_cosface.py --workdir /tmp/digits_cosface
"""

from margins import train_lib


def get_config(arg=None):
  config = train_lib.default_config()
  config.loss = dict(name="cosface", scale=16.0, margin=0.35)
  return train_lib.quick(config) if train_lib.is_quick(arg) else config
