"""Test set-up: 8 fake CPU devices and strict numerics, before JAX starts its backend.

Every test runs with JAX's dtype promotion set to ``strict`` and rank promotion set to ``raise``,
so silent upcasts and implicit broadcasting are bugs here; warnings are errors (see pyproject).
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache for each xdist worker and the subprocesses it starts (they
# inherit the environment): the training tests compile the same backbone programs many times,
# and XLA's CPU compiler takes seconds for each. One per worker, because JAX writes an entry in
# place without a lock (unless the cache has a size limit), so a worker could read an entry
# another is still writing. A new folder for each test run, deleted at its end, as on a new
# machine, unless MARGINS_TESTS_JAX_CACHE names one to keep. The controller sets the variable
# before it starts the workers.
_OWN_CACHE = "MARGINS_TESTS_JAX_CACHE" not in os.environ
if _OWN_CACHE:
  os.environ["MARGINS_TESTS_JAX_CACHE"] = tempfile.mkdtemp(prefix="margins-tests-jax-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
    os.environ["MARGINS_TESTS_JAX_CACHE"], os.environ.get("PYTEST_XDIST_WORKER", "main"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# LLVM's optimisation level 1 instead of XLA:CPU's default 2: the tests are compile-bound, and at
# level 1 XLA compiles a training step's programs in 60% of the time (the float16 training test,
# without the persistent cache: 10.7 s of backend compilation instead of 18.4 s, the test 20 s
# instead of 27 s), while the tests that run longer programs took the same time. The level sets how
# hard LLVM optimises the generated code, not what it computes: XLA:CPU does not enable fast math,
# so floating-point operations are not reordered at either level. A level already in XLA_FLAGS is
# kept.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

NUM_DEVICES = 8


def pytest_configure(config):
  del config
  assert len(jax.devices()) == NUM_DEVICES, jax.devices()


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ["MARGINS_TESTS_JAX_CACHE"], ignore_errors=True)
