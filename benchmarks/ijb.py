"""Cost of IJB-B/C evaluation on the host: reading and aligning the crops, scoring the templates.

Prints the images per second that ``margins.data.IJBSource`` (decode a JPEG crop, align it to
112 x 112) delivers through the evaluation pipeline for each ``--read-threads``, and the time and
peak memory of ``margins.evaluation.evaluate_ijb`` at a benchmark's size with random features
(defaults: IJB-C's 469,375 images in 23,124 templates and 19,557 same + 15,638,932 different
pairs, 512-d). Both are work the host does besides the network's forward passes.

  python benchmarks/ijb.py
  python benchmarks/ijb.py --images 1000 --templates 100 --pairs 5000 --crops 64
"""

import argparse
import pathlib
import resource
import tempfile
import time

import numpy as np
import PIL.Image

from margins import data as data_lib
from margins import evaluation
from margins.data import ijb


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=469_375)
  parser.add_argument("--templates", type=int, default=23_124)
  parser.add_argument("--pairs", type=int, default=19_557 + 15_638_932)
  parser.add_argument("--same-pairs", type=int, default=19_557)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--crops", type=int, default=512, help="crops written for the reading test")
  parser.add_argument("--crop-size", type=int, default=250)
  parser.add_argument("--read-threads", type=int, nargs="+", default=[1, 2])
  return parser.parse_args()


def write_crops(root: pathlib.Path, count: int, size: int) -> pathlib.Path:
  """An ``IJBC`` folder of ``count`` smooth JPEG crops ``size`` wide, one template each."""
  folder = root / "IJBC"
  (folder / "loose_crop").mkdir(parents=True)
  (folder / "meta").mkdir()
  points = " ".join(f"{v:.4f}" for v in (ijb.ARCFACE_LANDMARKS * size / 125 + 10).reshape(-1))
  y, x = np.mgrid[0:size, 0:size] / size
  scored, grouped = [], []
  for index in range(count):
    image = 128 + 60 * np.sin(np.pi * (x * (1 + index % 7) + y))[..., None] * [1, 0.8, 0.6]
    PIL.Image.fromarray(image.astype(np.uint8)).save(folder / "loose_crop" / f"{index}.jpg",
                                                     quality=95)
    scored.append(f"{index}.jpg {points} 0.9")
    grouped.append(f"{index}.jpg {index} {index}")
  (folder / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(scored) + "\n")
  (folder / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(grouped) + "\n")
  (folder / "meta" / "ijbc_template_pair_label.txt").write_text("0 1 0\n")
  return folder


def main():
  args = _parse_args()
  with tempfile.TemporaryDirectory() as root:
    source = data_lib.IJBSource(write_crops(pathlib.Path(root), args.crops, args.crop_size))
    print(f"Reading and aligning {args.crops} JPEG crops of {args.crop_size}x{args.crop_size}, "
          "batches of 32:")
    for threads in args.read_threads:
      start = time.perf_counter()
      for _ in data_lib.eval_dataset(source, batch_size=32, read_threads=threads, shard_index=0,
                                     shard_count=1):
        pass
      print(f"  {threads} read thread(s): {args.crops / (time.perf_counter() - start):,.0f} "
            "images/s")

  rng = np.random.default_rng(0)
  templates = np.sort(rng.integers(0, args.templates, args.images))
  protocol = data_lib.IJBProtocol(
      folder="", name="ijbc", files=[""] * args.images,
      landmarks=np.zeros((args.images, 5, 2)), detector_scores=rng.uniform(0.5, 1, args.images),
      templates=templates, media=templates * 10 + rng.integers(0, 3, args.images),
      pairs=rng.choice(np.unique(templates), (args.pairs, 2)),
      issame=np.arange(args.pairs) < args.same_pairs)
  features = rng.normal(size=(args.images, args.dim)).astype(np.float32)
  start = time.perf_counter()
  result = evaluation.evaluate_ijb(features, protocol)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"evaluate_ijb, {args.images:,} images, {len(np.unique(templates)):,} templates, "
        f"{args.pairs:,} pairs, {args.dim}-d: {seconds:.1f} s, peak memory of the process "
        f"{peak:.1f} GiB")
  print(evaluation.format_ijb("random features", result))


if __name__ == "__main__":
  main()
