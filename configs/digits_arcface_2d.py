r"""ArcFace on the digits with a 2-D embedding, for plotting the features on the circle.

  python train.py --config configs/digits_arcface_2d.py --workdir /tmp/digits_arcface_2d

Writes ``features_closed.png`` and ``features_open.png`` (features coloured by class) to the
workdir. Six classes on a circle leave 60 degrees each, so the margin is 0.2 rad; any loss
works: ``--config.loss.name=cosface --config.loss.margin=0.1``.
"""

from margins import train_lib


def get_config(arg=None):
  config = train_lib.default_config()
  config.model.embedding_dim = 2
  config.loss = dict(name="arcface", scale=16.0, margin=0.2)
  return train_lib.quick(config) if train_lib.is_quick(arg) else config
