r"""Plain softmax on the digits (the baseline of the margin papers).

  python train.py --config configs/digits_softmax.py --workdir /tmp/digits_softmax
"""

from margins import train_lib


def get_config(arg=None):
  config = train_lib.default_config()
  config.loss = dict(name="softmax")
  # Raw dot products start near zero (the head is drawn from N(0, 0.01)): 5x the learning rate
  # of the normalised losses, or softmax is still at 63% accuracy after 400 steps.
  config.optimizer.learning_rate = 0.05
  return train_lib.quick(config) if train_lib.is_quick(arg) else config
