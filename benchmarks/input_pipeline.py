"""Images/s of the training input pipeline alone, on an insightface-style RecordIO dataset.

Writes a temporary ``train.rec``/``train.idx``/``property`` of 112x112 JPEG images (as
insightface's datasets store them), then reads it with ``margins.data.train_dataset`` (shuffle,
decode, random flip, batch; the images stay uint8, normalised later on the devices) with 0
(in-process) and more grain worker processes, and prints images/s for each. Compare with what
the training step consumes: e.g. insightface reports ~5,000 images/s for an IResNet-50 on 8
V100s, i.e. ~625 per GPU process.

  python benchmarks/input_pipeline.py --images 4096 --workers 0 1 2
"""

import argparse
import os
import tempfile

import numpy as np

from margins import data as data_lib
from margins.data.image_folder import encode_image
from margins.tools import pack_recordio


def write_dataset(folder: str, num_images: int, num_classes: int, size: int) -> None:
  """``num_images`` smooth random JPEGs in insightface's RecordIO layout."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:size, 0:size] / size

  def images():
    for _ in range(num_images):
      phases = rng.uniform(0, 2 * np.pi, 3)
      image = np.stack([128 + 60 * np.sin(2 * np.pi * (k + 1) * (x + y) + p)
                        for k, p in enumerate(phases)], axis=-1)
      image = (image + rng.uniform(-20, 20, image.shape)).clip(0, 255).astype(np.uint8)
      yield encode_image(image, image_format="jpeg")

  labels = np.minimum(np.arange(num_images) // (num_images // num_classes), num_classes - 1)
  pack_recordio.write_identity_dataset(os.path.join(folder, "train"), labels, images(),
                                       num_classes=num_classes, image_size=(size, size))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=4096)
  parser.add_argument("--classes", type=int, default=64)
  parser.add_argument("--size", type=int, default=112)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--batches", type=int, default=20, help="batches timed per setting")
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  args = parser.parse_args()
  print(f"{os.cpu_count()} CPUs; {args.images} JPEG images {args.size}x{args.size}x3, "
        f"batches of {args.batch}")
  with tempfile.TemporaryDirectory() as folder:
    write_dataset(folder, args.images, args.classes, args.size)
    source = data_lib.RecordIOSource(folder)
    print("| worker processes | images/s |\n| ---: | ---: |")
    for workers in args.workers:
      dataset = data_lib.train_dataset(source, batch_size=args.batch, random_flip=True,
                                       worker_count=workers)
      speed = data_lib.measure_throughput(iter(dataset), args.batches, warmup_batches=2)
      print(f"| {workers} | {speed:,.0f} |")


if __name__ == "__main__":
  main()
