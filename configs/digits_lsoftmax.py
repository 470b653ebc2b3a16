r"""L-Softmax on the digits (Liu et al., ICML 2016), margin 4 with lambda annealing.

  python train.py --config configs/digits_lsoftmax.py --workdir /tmp/digits_lsoftmax

L-Softmax's unnormalised target ``|W||x| psi(theta)`` needs the same lambda annealing as
SphereFace to start training; the schedule is SphereFace's (base 1000, gamma 0.12, power 1,
lambda_min 5).
"""

from margins import train_lib


def get_config(arg=None):
  config = train_lib.default_config()
  config.loss = dict(name="lsoftmax", margin=4,
                     lambda_schedule=dict(base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0))
  config.optimizer.learning_rate = 0.05  # Unnormalised logits, as plain softmax.
  return train_lib.quick(config) if train_lib.is_quick(arg) else config
