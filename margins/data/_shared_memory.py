"""Large host arrays of a data source in shared memory, so grain's worker processes map one copy.

A source is pickled into every worker process; an array in grain's ``SharedMemoryArray`` pickles
as its name, and each worker maps the creating process's copy instead of unpickling its own.
"""

import os
import weakref

import grain
import numpy as np

# Arrays of at least this many bytes (2M int64 offsets) are held in shared memory.
MIN_BYTES = 16 * 2**20
FOLDER = "/dev/shm"


def shared(array: np.ndarray) -> np.ndarray:
  """``array`` in shared memory, pickled by name, from ``MIN_BYTES`` on and where ``FOLDER`` has
  room for it (twice over: grain's batches pass there too); else as it is.

  The returned array owns the memory, freed when it goes: a copy (what a worker unpickles) maps
  it only while the original lives, so hand new workers the original's holder, not a copy.
  """
  if array.nbytes < MIN_BYTES:
    return array
  try:
    folder = os.statvfs(FOLDER)
  except OSError:  # No /dev/shm (not Linux).
    return array
  if folder.f_bavail * folder.f_frsize < 2 * array.nbytes:  # Writing past it: SIGBUS.
    return array
  shared_array = grain.multiprocessing.SharedMemoryArray(array.shape, array.dtype)
  shared_array[...] = array
  # Freed when this process's array goes, or at its exit if the array outlives it (a pipeline's
  # iterator may hold the source to the end): else Python's resource tracker frees it and warns
  # of a leak. The workers' arrays only close it.
  weakref.finalize(shared_array, shared_array.shm.unlink)
  return shared_array
