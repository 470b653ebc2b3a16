"""Test set-up: 8 fake CPU devices and strict numerics, before JAX starts its backend.

Every test runs with JAX's dtype promotion set to ``strict`` and rank promotion set to ``raise``,
so silent upcasts and implicit broadcasting are bugs here; warnings are errors (see pyproject).
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, its xdist workers and the subprocesses the
# tests start (they inherit the environment): the training tests compile the same backbone
# programs many times, and XLA's CPU compiler takes seconds for each.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "margins-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# A size limit turns on the cache's file lock: without one, JAX writes entries in place, unlocked,
# and one xdist worker can read an entry another is still writing.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

NUM_DEVICES = 8


def pytest_configure(config):
  del config
  assert len(jax.devices()) == NUM_DEVICES, jax.devices()
