"""Data sources and the grain input pipeline.

Sources are grain random-access data sources of ``{"image": uint8 [H, W, C], "label": int32 []}``
with ``num_classes``, ``image_shape`` and ``labels`` (``int32 [N]``, read without decoding the
images); the pipeline turns one into batches of ``uint8`` images, which ``normalize_images`` maps
to ``float32`` in ``[-1, 1]`` on the devices.
"""

from margins.data.pipeline import RandomFlipAndCrop
from margins.data.pipeline import eval_dataset
from margins.data.pipeline import measure_throughput
from margins.data.pipeline import normalize_images
from margins.data.pipeline import train_dataset
from margins.data.sources import ArraySource
from margins.data.sources import SyntheticSource
from margins.data.sources import digits
from margins.data.ijb import IJBProtocol
from margins.data.ijb import IJBSource
from margins.data.ijb import align_face
from margins.data.ijb import read_ijb
from margins.data.image_folder import ImageFolderSource
from margins.data.recordio import RecordIOSource
from margins.data.tfds_source import TfdsSource
from margins.data.verification_bin import load_bin
from margins.data.verification_bin import write_bin
