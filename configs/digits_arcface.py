r"""ArcFace on the digits: the default experiment.

  python train.py --config configs/digits_arcface.py --workdir /tmp/digits_arcface

LeNets++ with a 32-d embedding on digits 0-5 (open set: 6-9 are held out for verification).
With six classes the scale is 16, not the paper's 64 (tuned for 85k identities: a scale that
large saturates the softmax of a few classes).
"""

from margins import train_lib


def get_config(arg=None):
  config = train_lib.default_config()
  config.loss = dict(name="arcface", scale=16.0, margin=0.5)
  return train_lib.quick(config) if train_lib.is_quick(arg) else config
