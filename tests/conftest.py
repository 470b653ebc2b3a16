"""Test set-up: 8 fake CPU devices and strict numerics, before JAX starts its backend.

Every test runs with JAX's dtype promotion set to ``strict`` and rank promotion set to ``raise``,
so silent upcasts and implicit broadcasting are bugs here; warnings are errors (see pyproject).
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache shared by the xdist workers and the subprocesses they start
# (they inherit the environment): the training tests compile the same backbone programs many
# times, and XLA's CPU compiler takes seconds for each. With a size limit JAX takes a file lock
# to read or write an entry, so no worker reads an entry another is still writing.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ.setdefault(
    "MARGINS_TESTS_JAX_CACHE", os.path.join(tempfile.gettempdir(), "margins-tests-jax-cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

NUM_DEVICES = 8


def pytest_configure(config):
  del config
  assert len(jax.devices()) == NUM_DEVICES, jax.devices()


# The files whose tests train models, start processes or run notebooks (each test 10-70 s on
# 2 cores), longest first: xdist hands the tests out in collection order, and a long test
# handed out last would leave the other worker idle at the end of the run.
_SLOW_FILES = ("test_train.py", "test_multihost.py", "test_notebooks.py", "test_data_parallel.py",
               "test_recipes.py", "test_benchmarks.py", "test_parallel.py", "test_models.py",
               "test_evaluate_export.py", "test_subcenter_drop.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return _SLOW_FILES.index(name) if name in _SLOW_FILES else len(_SLOW_FILES)

  items.sort(key=rank)  # Stable: each file's tests keep their order.
