"""Test set-up: 8 fake CPU devices and strict numerics, before JAX starts its backend.

Every test runs with JAX's dtype promotion set to ``strict`` and rank promotion set to ``raise``,
so silent upcasts and implicit broadcasting are bugs here; warnings are errors (see pyproject).
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache for each xdist worker and the subprocesses it starts (they
# inherit the environment): the training tests compile the same backbone programs many times,
# and XLA's CPU compiler takes seconds for each. One per worker, because JAX writes an entry in
# place without a lock (unless the cache has a size limit), so a worker could read an entry
# another is still writing. Set in every process: workers inherit the controller's environment.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
    os.environ.setdefault("MARGINS_TESTS_JAX_CACHE",
                          os.path.join(tempfile.gettempdir(), "margins-tests-jax-cache")),
    os.environ.get("PYTEST_XDIST_WORKER", "main"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

NUM_DEVICES = 8


def pytest_configure(config):
  del config
  assert len(jax.devices()) == NUM_DEVICES, jax.devices()
