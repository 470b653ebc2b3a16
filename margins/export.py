r"""Exports a run's embedding network as serialized StableHLO (``jax.export``), any batch size.

  python -m margins.export --workdir <run> --out <dir> [--step N] [--platforms cpu,cuda] \
      [--compute_dtype float32]

writes into ``<dir>``:

- ``model.stablehlo``: the network in evaluation mode with its weights, from ``float32
  [B, H, W, C]`` images in ``[-1, 1]`` to ``float32 [B, D]`` embeddings, for any ``B``; load it with
  ``jax.export.deserialize`` and call ``exported.call(images)``, on the platforms it was exported
  for (``--platforms``: any of cpu, cuda, rocm, tpu, whatever machine exports), computing in
  float32 whatever the run trained in (``--compute_dtype``: another, or ``run``, the run's own);
- ``model.json``: what a user needs to feed it and read it: the input shape (``NHWC``, where
  insightface's ONNX models take ``NCHW``), dtype and channels (RGB, as insightface's data are
  decoded, or grey), how uint8 pixels are normalised (``(x - 127.5) / 127.5``, i.e.
  ``(x / 255 - 0.5) / 0.5``), how other sizes are resized, the embedding dimension (the embeddings
  are not L2-normalised: compare them by cosine), and the platforms, step, model name and
  ``compute_dtype``; from
  the command line also ``flip_test``, whether the run's verification added each image's embedding
  and its mirror image's (``embed_folder --flip`` does): always for ``.bin`` sets, as
  insightface's, else as ``config.eval.flip``.

``python -m margins.embed_folder`` embeds a folder of images with it, without this code.
"""

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from absl import app
from absl import flags

from margins import cli_flags
from margins import distributed
from margins import embed_folder
from margins import eval_lib
from margins import train_lib
from margins import train_state

_PLATFORMS = flags.DEFINE_list(
    "platforms", ["cpu"], "Platforms to export for: cpu, cuda (or gpu), rocm, tpu (any machine "
    "can export for any of them).")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
for _name in ("workdir", "step", "out", "compute_dtype"):
  flags.declare_key_flag(_name)
_DISTRIBUTED = distributed.define_flags()
flags.adopt_module_key_flags(distributed)

# How ``margins.data.normalize_images`` maps uint8 pixels ``x`` to the model's input.
NORMALIZATION = "(x - 127.5) / 127.5, i.e. (x / 255 - 0.5) / 0.5, for uint8 pixels x"


def export_embedding_model(experiment: train_state.Experiment, state: train_state.TrainState, *,
                           platforms: Sequence[str] = ("cpu",)) -> jax.export.Exported:
  """The evaluation-mode embedding function with its weights, for a symbolic batch size ``b``.

  Args:
    experiment: the run's experiment (:func:`margins.train_lib.restore`).
    state: its state; the backbone's parameters and statistics become constants of the program.
    platforms: the platforms the program is lowered for, e.g. ``("cpu", "cuda")``.

  Returns:
    ``jax.export.Exported`` from ``float32 [b, H, W, C]`` images in ``[-1, 1]`` to
    ``float32 [b, D]``.
  """
  # Only the backbone, fetched to the host: the head and optimizer state are not needed, and the
  # program should not depend on the training mesh.
  weights = state.replace(params={"backbone": jax.device_get(state.params["backbone"])},
                          model_state=jax.device_get(state.model_state), opt_state=None,
                          centers=None)
  height, width, channels = experiment.image_shape
  images = jax.ShapeDtypeStruct(
      jax.export.symbolic_shape(f"b, {height}, {width}, {channels}"), jnp.float32)
  embed = jax.jit(lambda x: eval_lib.embed(experiment, weights, x))
  return jax.export.export(embed, platforms=tuple(platforms))(images)


def save_model(exported: jax.export.Exported, directory: str | os.PathLike[str],
               **info) -> None:
  """Writes ``model.stablehlo`` and ``model.json`` (with ``info``, e.g. the step) in ``directory``.

  :func:`margins.embed_folder.load_model` reads them back.
  """
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, embed_folder.MODEL_FILE), "wb") as file:
    file.write(exported.serialize())
  (images,), (embeddings,) = exported.in_avals, exported.out_avals
  metadata = dict(
      input_shape=[str(images.shape[0]), *images.shape[1:]], input_dtype=str(images.dtype),
      input_layout="NHWC", input_normalization=NORMALIZATION,
      channels="grey" if images.shape[3] == 1 else "RGB",
      resize="bilinear, without keeping the aspect ratio (Pillow's; embed_folder does it)",
      embedding_dim=embeddings.shape[1],
      embeddings="not L2-normalised; compare by cosine similarity",
      platforms=list(exported.platforms), **info)
  with open(os.path.join(directory, embed_folder.METADATA_FILE), "w") as file:
    json.dump(metadata, file, indent=2)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli_flags.refuse_unused(cli_flags.WORKDIR, cli_flags.STEP, cli_flags.OUT,
                          cli_flags.COMPUTE_DTYPE)
  cli_flags.quiet_library_logs()
  # Several tasks (srun / mpirun, --multihost, --coordinator_address): one job over all of them,
  # written by process 0 (else every task restores alone, on all its node's GPUs, and writes).
  distributed.initialize_from_flags(_DISTRIBUTED)
  workdir, out = cli_flags.WORKDIR.value, cli_flags.OUT.value
  if not workdir or not out:
    raise app.UsageError("--workdir (the training run) and --out (a folder) are required.")
  if not os.path.isdir(workdir):
    raise app.UsageError(f"--workdir {workdir} is not a directory.")
  if os.path.exists(out) and not os.path.isdir(out):
    raise app.UsageError(f"--out {out} is a file, not a folder.")
  platforms = list(dict.fromkeys(  # Each once, in the order given (gpu and cuda are one).
      {"gpu": "cuda"}.get(name.lower(), name.lower()) for name in _PLATFORMS.value))
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise app.UsageError(f"--platforms: {unknown or 'none given'}; choose among {PLATFORMS}.")
  try:
    experiment, state = train_lib.restore(workdir, cli_flags.STEP.value, parts="backbone",
                                          compute_dtype=cli_flags.compute_dtype())
  except (FileNotFoundError, ValueError) as error:  # Not a run's workdir, no such step, ...
    raise app.UsageError(str(error)) from error
  exported = export_embedding_model(experiment, state, platforms=platforms)
  step = int(state.step)
  if jax.process_index():
    return
  evaluated = experiment.config.eval
  save_model(exported, out, step=step, model=experiment.config.model.name,
             compute_dtype=train_lib.eval_compute_dtype(experiment.config),
             flip_test=bool(evaluated.bins) or bool(evaluated.flip))
  print(f"Exported {experiment.config.model.name} at step {step} for "
        f"{', '.join(exported.platforms)} to {out}.", flush=True)


if __name__ == "__main__":
  app.run(main)
