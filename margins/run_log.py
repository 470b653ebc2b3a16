"""What a run writes for people: progress and result lines, ``metrics.jsonl`` and TensorBoard
events."""

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax

from margins import evaluation


def write_atomically(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file beside it: a crash leaves the old file
  or the new one, never a part."""
  temporary = f"{path}.tmp"
  with open(temporary, "w") as f:
    f.write(text)
  os.replace(temporary, path)


class MetricWriter:
  """``metrics.jsonl`` and TensorBoard events in ``workdir``, written by process 0 only.

  ``metrics.jsonl`` is strict JSON, one object per line: a value that is not finite (a TAR at a
  FAR the number of pairs cannot resolve, a diverged loss) is ``null`` there and left out of the
  TensorBoard events (lines that versions before 2026-12-06 wrote, kept on a resume, may hold
  ``NaN``). On resume, lines past the restored step are dropped, so the file reads as one run.
  """

  def __init__(self, workdir: str, resume_step: int):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard = None
    if not self.active:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if _is_whole_and_until(line, resume_step)]
      write_atomically(self.path, "".join(kept))
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    # ``purge_step``: TensorBoard hides the events of the steps past ``resume_step`` that the
    # interrupted run wrote, as the lines of ``metrics.jsonl`` above are dropped.
    self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                     purge_step=resume_step + 1)

  def write(self, step: int, metrics: Mapping[str, Any], *, replace: bool = False) -> None:
    """Appends a line of ``metrics`` (names starting with ``_`` left out) for ``step``.

    ``replace``: first drop the lines of ``step`` that hold any of these metrics, which a run
    that stopped may have written (an evaluation done again where a run resumes).
    """
    if not self.active:
      return
    scalars = {k: float(v) for k, v in metrics.items() if not k.startswith("_")}
    if replace and os.path.exists(self.path):
      with open(self.path) as f:
        lines = f.readlines()
      kept = [line for line in lines if not _holds_any(line, step, scalars)]
      if len(kept) < len(lines):
        write_atomically(self.path, "".join(kept))
    # Not finite: e.g. TAR at a FAR the number of pairs cannot resolve (NaN). Strict JSON has no
    # NaN or infinity, so such a value is null there, and TensorBoard is not given it.
    finite = {k: v for k, v in scalars.items() if math.isfinite(v)}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **{k: finite.get(k) for k in scalars}}, allow_nan=False)
              + "\n")
    for name, value in finite.items():
      self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()


def _is_whole_and_until(line: str, step: int) -> bool:
  """Whether a ``metrics.jsonl`` line is whole and of a step up to ``step``: a machine that
  crashed (or a full disk) may have left its last line cut short or zeroed."""
  try:
    return json.loads(line)["step"] <= step
  except (ValueError, KeyError, TypeError):
    return False


def _holds_any(line: str, step: int, names: Mapping[str, Any]) -> bool:
  """Whether a whole ``metrics.jsonl`` line is of ``step`` and holds any metric of ``names``, or
  any of the evaluation sets they name (``lfw`` of ``lfw/auc``)."""
  values = json.loads(line)
  # A set's metrics differ with its outcome (``lfw/auc`` ... or ``lfw/non_finite_embeddings``).
  sets = {name.split("/")[0] for name in names if "/" in name}
  return values["step"] == step and any(
      name in names or name.split("/")[0] in sets for name in values if name != "step")


def report(line: str) -> None:
  """Prints a progress or result line (process 0 only) where a person running the job reads."""
  if jax.process_index() == 0:
    print(line, flush=True)


def progress_line(step, num_steps, metrics, images_per_second, seconds_left) -> str:
  """The line a run prints every ``config.log_every`` steps: loss, learning rate, speed, ETA."""
  hours, seconds = divmod(int(max(seconds_left, 0)), 3600)  # Hours past 24 too: runs take days.
  eta = f"{hours:02d}:{seconds // 60:02d}:{seconds % 60:02d}"
  # float16's steps skipped on an overflow so far, where there are any.
  skipped = f" | {int(metrics['skipped'])} skipped" if metrics.get("skipped", 0) > 0 else ""
  return (f"step {step}/{num_steps} | loss {float(metrics['loss']):.4f} | "
          f"lr {float(metrics['learning_rate']):.4g}{skipped} | {images_per_second:,.0f} img/s | "
          f"ETA {eta}")


def summary_lines(metrics: Mapping[str, Any], *, open_flip: bool) -> list[str]:
  """Log lines of :func:`margins.eval_lib.evaluate`'s metrics; ``open_flip``: whether the open
  set's embeddings were flip-summed (``config.eval.flip``; ``.bin`` sets always are)."""
  lines = []
  if "closed/accuracy" in metrics:
    lines.append(f"[closed set] accuracy: {metrics['closed/accuracy']:.4f}")
  for name, result in metrics["_results"].items():
    if len(result) == 3:
      flip = open_flip if name == "open" else True
      lines.append(evaluation.format_verification(name, result[2], flip=flip))
  suffix = "/non_finite_embeddings"
  lines.extend(f"[{key[:-len(suffix)]}] not evaluated: {count} of its embeddings are not finite "
               "(NaN or infinite: a float16 forward pass that overflowed?)"
               for key, count in metrics.items() if key.endswith(suffix))
  return lines
