r"""Plain softmax on the digits (the baseline of the margin papers).

  python train.py --config configs/digits_softmax.py --workdir /tmp/digits_softmax
"""

from margins import train_lib


def get_config(arg=None):
  config = train_lib.default_config()
  config.loss = dict(name="softmax")
  return train_lib.quick(config) if arg == "quick" else config
