"""Multi-process runs on JAX's own runtime (``jax.distributed``).

One Python process per host (or per GPU); each sees its local devices, and after
:func:`initialize` all processes see every device of the job, so the mesh, the class-sharded
head and orbax checkpoints span all hosts. :func:`initialize` starts the runtime from explicit
values (a coordinator address, the number of processes and this process's id), or lets JAX read
them from the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU pods); single-process runs need
nothing. ``train.py`` and the tools take the same flags for it (:func:`define_flags`).
"""

import functools
import os
from typing import NamedTuple

import jax
from absl import app
from absl import flags
from absl import logging

# Environment variables that tell a scheduler started more than one task of this program.
_TASK_COUNT_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def launched_as_multiple_tasks() -> bool:
  """Whether SLURM or Open MPI started several processes of this job."""
  return any(int(os.environ.get(name, "1")) > 1 for name in _TASK_COUNT_VARIABLES)


def _explicit(coordinator_address: str | None, num_processes: int | None,
              process_id: int | None) -> bool:
  """Whether the job's values are given; ``ValueError`` if only some are, or a bad id."""
  explicit = (coordinator_address, num_processes, process_id)
  if all(v is None for v in explicit):
    return False
  if any(v is None for v in explicit):
    raise ValueError("coordinator_address, num_processes and process_id go together; got "
                     f"{coordinator_address!r}, {num_processes!r}, {process_id!r}.")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} is not in [0, {num_processes}).")
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"coordinator_address {coordinator_address!r} must be host:port, the "
                     "port in [1, 65535].")
  return True


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               timeout_s: int = 300) -> bool:
  """Starts ``jax.distributed`` when this is one process of several; returns whether it did.

  Args:
    coordinator_address: ``host:port`` of process 0; with it, ``num_processes`` and
      ``process_id`` are required (a bare-metal or hand-launched job).
    num_processes: processes in the job.
    process_id: this process's index, ``0 .. num_processes - 1``.
    auto: let JAX detect the cluster (Cloud TPU pods, Kubernetes, SLURM, Open MPI). Under
      SLURM or Open MPI with more than one task this happens without asking.
    timeout_s: seconds to wait for every process to join before failing (JAX's
      ``initialization_timeout``, 300 by default).
  """
  if _explicit(coordinator_address, num_processes, process_id):
    logging.info("Process %d: waiting for all %d processes at %s.", process_id, num_processes,
                 coordinator_address)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s)
  elif auto or launched_as_multiple_tasks():
    jax.distributed.initialize(initialization_timeout=timeout_s)
  else:
    return False
  logging.info("Process %d of %d; %d local and %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


class Flags(NamedTuple):
  """The command-line flags of :func:`initialize` (absl ``FlagHolder`` s)."""
  coordinator_address: flags.FlagHolder
  num_processes: flags.FlagHolder
  process_id: flags.FlagHolder
  multihost: flags.FlagHolder
  timeout_s: flags.FlagHolder


@functools.cache
def define_flags() -> Flags:
  """Defines ``--coordinator_address``, ``--num_processes``, ``--process_id``, ``--multihost``
  and ``--distributed_timeout_s`` once, whichever of ``train.py`` and the tools asks first (absl
  refuses a flag defined twice). A program lists them in its ``--help`` with
  ``flags.adopt_module_key_flags(distributed)``."""
  holders = Flags(
      flags.DEFINE_string(
          "coordinator_address", None, "Multi-process: host:port of process 0 (with "
          "--num_processes and --process_id). Not needed under SLURM or Open MPI."),
      flags.DEFINE_integer("num_processes", None, "Multi-process: processes in all."),
      flags.DEFINE_integer("process_id", None, "Multi-process: this process's index."),
      flags.DEFINE_bool("multihost", False, "Let JAX detect the cluster (Cloud TPU pods, "
                        "Kubernetes) and start the multi-process runtime."),
      flags.DEFINE_integer("distributed_timeout_s", 300, "Multi-process: seconds to wait for "
                           "every process to join (raise it where hosts start minutes apart).",
                           lower_bound=1))
  flags.register_multi_flags_validator(
      ["coordinator_address", "num_processes", "process_id"], _explicit_flags_fit)
  return holders


def _explicit_flags_fit(values: dict[str, object]) -> bool:
  try:
    _explicit(values["coordinator_address"], values["num_processes"], values["process_id"])
  except ValueError as error:
    raise flags.ValidationError(str(error)) from error
  return True


def initialize_from_flags(holders: Flags) -> bool:
  """:func:`initialize` with the values of :func:`define_flags`' flags; a job JAX cannot start
  (``--multihost`` where it finds no cluster) is a usage error, not a traceback."""
  try:
    return initialize(holders.coordinator_address.value, holders.num_processes.value,
                      holders.process_id.value, auto=holders.multihost.value,
                      timeout_s=holders.timeout_s.value)
  except ValueError as error:
    raise app.UsageError(
        f"Cannot start the multi-process runtime: {error} Outside a cluster that JAX detects "
        "(Cloud TPU pods, Kubernetes, SLURM, Open MPI), give --coordinator_address, "
        "--num_processes and --process_id.") from error
