"""Multi-process runs on JAX's own runtime (``jax.distributed``).

One Python process per host (or per GPU); each sees its local devices, and after
:func:`initialize` all processes see every device of the job, so the mesh, the class-sharded
head and orbax checkpoints span all hosts. :func:`initialize` starts the runtime from explicit
values (a coordinator address, the number of processes and this process's id), or lets JAX read
them from the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU pods); single-process runs need
nothing.
"""

import os

import jax
from absl import logging

# Environment variables that tell a scheduler started more than one task of this program.
_TASK_COUNT_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def launched_as_multiple_tasks() -> bool:
  """Whether SLURM or Open MPI started several processes of this job."""
  return any(int(os.environ.get(name, "1")) > 1 for name in _TASK_COUNT_VARIABLES)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False) -> bool:
  """Starts ``jax.distributed`` when this is one process of several; returns whether it did.

  Args:
    coordinator_address: ``host:port`` of process 0; with it, ``num_processes`` and
      ``process_id`` are required (a bare-metal or hand-launched job).
    num_processes: processes in the job.
    process_id: this process's index, ``0 .. num_processes - 1``.
    auto: let JAX detect the cluster (Cloud TPU pods, Kubernetes, SLURM, Open MPI). Under
      SLURM or Open MPI with more than one task this happens without asking.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("coordinator_address, num_processes and process_id go together; got "
                       f"{coordinator_address!r}, {num_processes!r}, {process_id!r}.")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id {process_id} is not in [0, {num_processes}).")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif auto or launched_as_multiple_tasks():
    jax.distributed.initialize()
  else:
    return False
  logging.info("Process %d of %d; %d local and %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
