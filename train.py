r"""Trains an embedding network with a margin loss: ``train.py --config <file> --workdir <dir>``.

Every config field can be overridden on the command line, e.g.::

  python train.py --config configs/digits_arcface.py --workdir /tmp/arcface \
      --config.loss.margin=0.4 --config.num_steps=3000

``--config configs/<file>.py:quick`` runs a short version of the same experiment (under a minute
for the digits configs, 1-3 minutes for the recipes on a 2-core CPU). Restarting with the same
``--workdir`` resumes from its latest checkpoint. On SIGTERM (a scheduler's preemption) the run
saves a checkpoint at the end of its current step and exits with status 143. See
:mod:`margins.train_lib`.
"""

import signal
import sys
import textwrap

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from margins import checkpoints
from margins import distributed
from margins import run_log
from margins import train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_DISTRIBUTED = distributed.define_flags()
flags.adopt_module_key_flags(distributed)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO.
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  # A job that cannot start, a config that cannot run, or cannot resume the run in the workdir:
  # its message alone, not a traceback (nor the flags' help, which absl prints for a UsageError).
  try:
    distributed.initialize_from_flags(_DISTRIBUTED)
    logging.info("Config:\n%s", config)
    train_lib.checked_mesh(config, _WORKDIR.value)
  except (app.UsageError, ValueError, FileNotFoundError) as error:
    sys.exit(f"FATAL {error}")
  try:
    train_lib.train_and_evaluate(config, _WORKDIR.value)
  except train_lib.CannotStart as error:  # Found before the state is built.
    sys.exit(f"FATAL {error}")
  except checkpoints.Preempted as preempted:
    run_log.report(str(preempted))
    sys.exit(128 + signal.SIGTERM)  # As if SIGTERM had ended it: the job did not finish.


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, where a config file that fails to load or a ``--config.<field>`` that
  the config lacks is a usage error as a malformed flag is, not ml_collections' traceback."""
  try:
    argv = app.parse_flags_with_usage(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.keys()  # ml_collections defers a file's failure to load until it is read.
    return argv
  except OSError as error:
    sys.exit(f"FATAL Flags parsing error: --config: {error.__cause__ or error}\n"
             "Pass --helpshort or --helpfull to see help on flags.")
  except (AttributeError, KeyError) as error:  # A missing last field, or one on the way to it.
    missing = error if isinstance(error, KeyError) else error.args[0] if error.args else None
    text = str(missing.args[0]) if isinstance(missing, KeyError) and missing.args else ""
    given = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)  # --flagfile's too.
    overridden = {part for arg in given if arg.startswith("--config.")
                  for part in arg.removeprefix("--config.").split("=")[0].split(".")}
    if (text.splitlines()[0].strip("'\"") if text else None) not in overridden:
      raise  # The config file's own error.
    field = textwrap.indent(text, "  ")
    sys.exit("FATAL Flags parsing error: a --config override names a field the config lacks:\n"
             f"{field}\nPass --helpshort or --helpfull to see help on flags.")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
