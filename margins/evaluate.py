r"""Evaluates a training run's checkpoint on ``.bin`` verification sets (LFW, CFP-FP, AgeDB-30 ...)
and on IJB-B / IJB-C.

  python -m margins.evaluate --workdir <run> --bin lfw.bin --bin cfp_fp.bin \
      [--ijb /data/IJBC [--ijb_operating_point nearest]] [--step N] [--batch_size 256] [--noflip]
      [--compute_dtype float32]

restores the run's latest checkpoint (or ``--step``) on the devices present, with the network in
float32 whatever the run trained in (``--compute_dtype``), embeds every set with
the flip test (``--noflip``: each image alone, as a deployment without it runs) and prints one row
per ``.bin`` set by insightface's protocol (10-fold accuracy mean +- std, TAR@FAR 1e-3 and 1e-4 from
the ROC of all pairs, AUC, XNorm; ``n/a`` where a set has too few different pairs to measure the
FAR), then writes their ROC curves to ``<run>/roc_<step>.png`` (``--out``: another file). Each
``--ijb`` folder (``loose_crop/`` and ``meta/``, as insightface distributes IJB-B and IJB-C) is
scored by template (:mod:`margins.evaluation.ijb`): TAR at FAR 1e-6 ... 1e-1 and the AUC;
``--ijb_operating_point nearest`` reads TAR@FAR off the ROC as insightface's ``eval_ijbc.py`` does,
for comparison with published tables.
"""

import functools
import os
from collections.abc import Mapping, Sequence

import jax
from absl import app
from absl import flags

from margins import cli_flags
from margins import data as data_lib
from margins import distributed
from margins import eval_lib
from margins import evaluation
from margins import train_lib

_BINS = flags.DEFINE_multi_string(
    "bin", [], "A .bin verification file; repeat the flag for several sets.")
_IJB = flags.DEFINE_multi_string(
    "ijb", [], "An IJB-B or IJB-C folder (loose_crop/, meta/); repeat the flag for both.")
_IJB_OPERATING_POINT = flags.DEFINE_enum(
    "ijb_operating_point", "at_most", evaluation.ijb.OPERATING_POINTS,
    "How IJB TAR@FAR reads the ROC: the highest TAR whose FAR is at most the target, or "
    "insightface's eval_ijbc.py's point nearest the target (its FAR may exceed it).")
for _name in ("workdir", "step", "batch_size", "out", "flip", "compute_dtype"):
  flags.declare_key_flag(_name)
_DISTRIBUTED = distributed.define_flags()
flags.adopt_module_key_flags(distributed)

# The columns of the table: TAR at these false-accept rates.
TABLE_FARS = (1e-3, 1e-4)


def evaluate_run(workdir: str, bin_paths: Sequence[str], *, ijb_folders: Sequence[str] = (),
                 step: int | None = None, batch_size: int | None = None,
                 ijb_operating_point: str = "at_most", flip: bool = True,
                 compute_dtype: str | None = "float32",
                 ) -> tuple[int, dict[str, evaluation.VerificationResult | evaluation.IJBResult]]:
  """``(step, {set name: result})``: a run's checkpoint on ``.bin`` sets and IJB folders (named
  by their meta files' prefix, ``ijbc``), with the flip test unless ``flip`` is false.

  Args:
    workdir: the training run's directory.
    bin_paths: ``.bin`` verification files.
    ijb_folders: IJB-B / IJB-C folders.
    step: the checkpoint to load; ``None``: the latest.
    batch_size: images per batch over all devices (a multiple of their number); ``None``:
      :data:`margins.eval_lib.DEFAULT_BATCH_SIZE` rounded up to one.
    ijb_operating_point: how IJB TAR@FAR reads the ROC
      (:func:`margins.evaluation.evaluate_ijb`'s ``operating_point``).
    compute_dtype: the network's arithmetic (:func:`margins.train_lib.restore`'s: ``"run"``, the
      run's ``config.compute_dtype``; ``None``, its ``config.eval.compute_dtype``).
  """
  names = [eval_lib.bin_set_name(path) for path in bin_paths]
  names += [data_lib.ijb.benchmark_name(folder) for folder in ijb_folders]
  eval_lib.check_set_names(names, given_as="--bin files or --ijb folders")
  experiment, state = train_lib.restore(workdir, step, parts="backbone",
                                        compute_dtype=compute_dtype)
  experiment.config.eval.batch_size = eval_lib.global_batch_size(batch_size,
                                                                  experiment.mesh.size)
  embed_fn = jax.jit(lambda s, x: eval_lib.embed(experiment, s, x))
  # Every .bin set is read (and checked) before any is embedded.
  bin_sets = {name: eval_lib.load_bin_set(experiment.image_shape, path)
              for name, path in zip(names, bin_paths)}
  evaluations = {name: functools.partial(eval_lib.verify_bin_set, experiment, state, *bin_set)
                 for name, bin_set in bin_sets.items()}
  evaluations.update({name: functools.partial(eval_lib.evaluate_ijb, experiment, state, folder,
                                              operating_point=ijb_operating_point)
                      for name, folder in zip(names[len(bin_paths):], ijb_folders)})
  results = {}
  with jax.set_mesh(experiment.mesh):
    for name, evaluate_set in evaluations.items():
      try:
        results[name] = evaluate_set(embed_fn=embed_fn, flip=flip)
      except eval_lib.NonFiniteEmbeddings as error:
        raise ValueError(f"{name}: {error}") from error
  return int(state.step), results


def format_table(results: Mapping[str, evaluation.VerificationResult], *,
                 flip: bool = True) -> str:
  """One row per set: ``Accuracy-Flip`` (mean+-std over folds; ``Accuracy`` without the flip
  test), TAR@FAR 1e-3 and 1e-4, AUC and insightface's XNorm (mean embedding norm; ``n/a`` where
  not measured).

  >>> import numpy as np
  >>> from margins.evaluation import evaluate_verification
  >>> from margins.evaluate import format_table
  >>> rng = np.random.default_rng(0)
  >>> issame = np.arange(2000) % 2 == 0
  >>> first = rng.normal(size=(2000, 16))
  >>> second = np.where(issame[:, None], first + 0.8 * rng.normal(size=(2000, 16)),
  ...                   rng.normal(size=(2000, 16)))
  >>> result = evaluate_verification(np.stack([first, second], 1).reshape(4000, 16), issame)
  >>> print(format_table({"toy": result}))
  | Set | Accuracy-Flip    | TAR@FAR=1e-03 | TAR@FAR=1e-04 | AUC     | XNorm |
  |-----|------------------|---------------|---------------|---------|-------|
  | toy | 0.97750+-0.00873 | 0.75100       | n/a           | 0.99761 | n/a   |
  """
  header = ["Set", "Accuracy-Flip" if flip else "Accuracy",
            *(f"TAR@FAR={far:.0e}" for far in TABLE_FARS), "AUC", "XNorm"]
  cell = evaluation.verification.format_value
  rows = [[name, f"{r.accuracy:.5f}+-{r.accuracy_std:.5f}",
           *(cell(r.tar_at_far[far]) for far in TABLE_FARS), cell(r.auc), cell(r.xnorm)]
          for name, r in results.items()]
  widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
  lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |"
           for row in [header, *rows]]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli_flags.quiet_library_logs()
  # Several tasks (srun / mpirun, --multihost, --coordinator_address): one job over all of them,
  # printed and plotted by process 0 (else each task evaluates alone and all write the same ROC).
  distributed.initialize_from_flags(_DISTRIBUTED)
  workdir = cli_flags.WORKDIR.value
  if not workdir:
    raise app.UsageError("--workdir is required: the training run's directory.")
  if not _BINS.value and not _IJB.value:
    raise app.UsageError("Give at least one --bin verification file or --ijb folder.")
  if not os.path.isdir(workdir):
    raise app.UsageError(f"--workdir {workdir} is not a directory.")
  missing = [path for path in _BINS.value if not os.path.isfile(path)]
  if missing:
    raise app.UsageError(f"--bin: no such file: {', '.join(missing)}")
  missing = [folder for folder in _IJB.value if not os.path.isdir(folder)]
  if missing:
    raise app.UsageError(f"--ijb: no such folder: {', '.join(missing)}")
  flip = cli_flags.flip_test(True)
  compute_dtype = cli_flags.compute_dtype()
  try:
    step, results = evaluate_run(workdir, _BINS.value, ijb_folders=_IJB.value,
                                 step=cli_flags.STEP.value, batch_size=cli_flags.BATCH_SIZE.value,
                                 ijb_operating_point=_IJB_OPERATING_POINT.value, flip=flip,
                                 compute_dtype=compute_dtype)
  except (FileNotFoundError, ValueError) as error:  # Not a run's workdir, no such step, ...
    raise app.UsageError(str(error)) from error
  if jax.process_index() != 0:
    return
  bins = {name: r for name, r in results.items() if isinstance(r, evaluation.VerificationResult)}
  arithmetic = "the run's compute_dtype" if compute_dtype == "run" else compute_dtype
  lines = [f"{workdir}, step {step}, in {arithmetic}:",
           *([format_table(bins, flip=flip)] if bins else []),
           *(evaluation.format_ijb(name, r) for name, r in results.items()
             if isinstance(r, evaluation.IJBResult))]
  print("\n".join(lines), flush=True)  # Before the plot, which may fail (a read-only run).
  if bins:
    path = cli_flags.OUT.value or os.path.join(workdir, f"roc_{step}.png")
    try:
      plot = evaluation.plot_roc(bins, path, title=f"Verification ROC at step {step}")
    except OSError as error:
      raise app.UsageError(f"The ROC curves were not written ({error}); --out names another "
                           "file.") from error
    print(f"ROC curves: {plot}", flush=True)


if __name__ == "__main__":
  app.run(main)
