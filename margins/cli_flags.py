"""Flags that several command-line tools read, defined once so the tools can be imported together.

absl keeps one global set of flags, and a flag name defined by two modules is an error; the tools
(``python -m margins.evaluate``, ``margins.export``, ``margins.embed_folder``,
``margins.tools.subcenter_drop``) take these from here and define only their own.
"""

from absl import app
from absl import flags
from absl import logging

from margins._checks import EVAL_COMPUTE_DTYPES

WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory (its --workdir).")
STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Images per batch (default 256): over all devices, a multiple of their "
    "number, the default rounded up to one (evaluate, tools.subcenter_drop); on one device "
    "(embed_folder).", lower_bound=1)
OUT = flags.DEFINE_string(
    "out", None, "Where to write: the exported model's folder (export), the .npy file "
    "(embed_folder), the cleaned dataset's folder (tools.subcenter_drop) or the ROC plot "
    "(evaluate; default <workdir>/roc_<step>.png).")
FLIP = flags.DEFINE_bool(
    "flip", None, "The flip test: add each image's embedding and its mirror image's (default: on "
    "in evaluate, as insightface's protocol; off in embed_folder).")
COMPUTE_DTYPE = flags.DEFINE_enum(
    "compute_dtype", "float32", list(EVAL_COMPUTE_DTYPES),
    "The network's arithmetic (evaluate, export, subcenter_drop): float32 whatever the run "
    "trained in, as insightface evaluates (eval_ijbc.py) and exports (float32 ONNX), another, "
    "or 'run': the run's config.compute_dtype (the recipes' bfloat16 moves pair cosines by "
    "about 1e-3).")
_SHARED = (WORKDIR, STEP, BATCH_SIZE, OUT, FLIP, COMPUTE_DTYPE)


def flip_test(default: bool) -> bool:
  """``--flip`` or ``--noflip`` if given, else the tool's ``default``."""
  return default if FLIP.value is None else FLIP.value


def compute_dtype() -> str:
  """``--compute_dtype``: a dtype's name, or ``run``, the run's ``config.compute_dtype``."""
  return COMPUTE_DTYPE.value


def refuse_unused(*used: flags.FlagHolder) -> None:
  """Raises ``app.UsageError`` if the command line gives one of these shared flags that the
  tool does not read (``used`` are those it reads): absl defines them for every tool."""
  read = {holder.name for holder in used}
  unread = [f"--{holder.name}" for holder in _SHARED
            if holder.name not in read and flags.FLAGS[holder.name].present]
  if unread:
    raise app.UsageError(f"{', '.join(unread)}: this tool does not read "
                         f"{'it' if len(unread) == 1 else 'them'}.")


def quiet_library_logs() -> None:
  """Shows warnings and errors only, unless ``--verbosity`` was given: at absl's default (INFO)
  orbax logs every step of every checkpoint it opens or writes, dozens of lines per restore."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
