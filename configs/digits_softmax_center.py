r"""Softmax + center loss on the digits (Wen et al., ECCV 2016).

  python train.py --config configs/digits_softmax_center.py --workdir /tmp/digits_center

The centres follow the paper's update rule with alpha 0.5; lambda (the weight) 0.01 is the
paper's MNIST value, on a 2-D embedding as in its figures.
"""

from margins import train_lib


def get_config(arg=None):
  config = train_lib.default_config()
  config.loss = dict(name="softmax")
  # Raw dot products start near zero (the head is drawn from N(0, 0.01)): 5x the learning rate
  # of the normalised losses, or softmax is still at 63% accuracy after 400 steps.
  config.optimizer.learning_rate = 0.05
  config.center_loss = dict(weight=0.01, alpha=0.5)
  config.model.embedding_dim = 2
  return train_lib.quick(config) if train_lib.is_quick(arg) else config
