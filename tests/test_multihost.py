"""Multi-host training for real: two ``train.py`` processes equal one process with four devices.

The two processes (two CPU devices each) meet through ``jax.distributed`` on 127.0.0.1 and train
the digits quick config with the class-sharded head split over all four devices; each reads its
own half of the data and writes its own part of the orbax checkpoints. Every global batch is
the single process's batch, in its order (process 0 reads the first half of each, process 1 the
second), so the two micro-batches of each step hold the same examples too and Partial FC
samples the same classes for them; losses and parameters agree up to float summation order.

Both runs use the ``rbg`` PRNG: XLA's CPU compiler spends 15-35 s of CPU on the unrolled threefry
of the parameter initialisation, ``rbg`` under 4 s. A compilation cache would not help: keys
differ between processes and only process 0 writes entries.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from margins import train_lib
from tests.test_train import ROOT, load_config, read_metrics

# ``eval.flip``: the mirror images are made on the devices, from a batch split over processes;
# BatchNorm's statistics are each device's rows', which the processes' batches must keep.
_OVERRIDES = {"num_steps": 3, "log_every": 1, "checkpoint_every": 3, "eval.num_pairs": 100,
              "eval.flip": True, "engine.kind": "sharded", "engine.chunk_size": 2,
              "engine.sample_rate": 0.5, "micro_batches": 2, "model.kwargs.batch_norm": True,
              "model.batch_stats": "device"}
_TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_processes(workdir, logs, process_args=((), ()), **overrides):
  """Two train.py processes; ``process_args``: each one's own extra arguments."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
             JAX_DEFAULT_PRNG_IMPL="rbg")
  command = [sys.executable, os.path.join(ROOT, "train.py"),
             f"--config={os.path.join(ROOT, 'configs', 'digits_arcface.py')}:quick",
             f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2"] + [f"--config.{k}={v}"
                                     for k, v in {**_OVERRIDES, **overrides}.items()]
  processes = []
  for i in range(2):
    stdout, stderr = open(logs / f"stdout_{i}.txt", "w"), open(logs / f"stderr_{i}.txt", "w")
    processes.append(subprocess.Popen(command + [f"--process_id={i}", *process_args[i]],
                                      env=env, stdout=stdout, stderr=stderr))
    stdout.close()
    stderr.close()
  return processes


def _wait(processes, logs):
  """Waits for both processes; on an error or a hang, fails with what both printed."""
  deadline = time.monotonic() + _TIMEOUT_S
  while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
    if any(p.poll() not in (None, 0) for p in processes):
      time.sleep(5)  # Give the other process a moment to report its side of it.
      break
    time.sleep(0.2)
  hung = [i for i, p in enumerate(processes) if p.poll() is None]
  for i in hung:
    processes[i].kill()
    processes[i].wait()
  codes = [p.returncode for p in processes]
  if hung or any(codes):
    outputs = "\n".join(
        f"--- process {i} ({'killed: still running' if i in hung else f'exit code {codes[i]}'}) "
        f"{name}:\n{(logs / f'{name}_{i}.txt').read_text()[-6000:]}"
        for i in range(2) for name in ("stdout", "stderr"))
    pytest.fail(f"The two-process run failed:\n{outputs}", pytrace=False)


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
  two, logs = tmp_path / "two", tmp_path / "logs"
  logs.mkdir()
  processes = _start_processes(two, logs)
  try:
    # Meanwhile, the reference in this process on 4 of its devices.
    config = load_config(os.path.join(ROOT, "configs", "digits_arcface.py"))
    config.update_from_flattened_dict(_OVERRIDES)
    config.mesh.shape = (4,)
    with jax.default_prng_impl("rbg"):
      train_lib.train_and_evaluate(config, str(tmp_path / "one"))
  finally:
    _wait(processes, logs)

  steps = config.num_steps
  stdout = [(logs / f"stdout_{i}.txt").read_text() for i in range(2)]
  assert f"step {steps}/{steps}" in stdout[0]
  assert "step " not in stdout[1]  # Only process 0 reports.
  for name in ("state/ocdbt.process_0", "state/ocdbt.process_1"):
    assert os.path.exists(two / "checkpoints" / str(steps) / name), name

  one_metrics, two_metrics = read_metrics(str(tmp_path / "one")), read_metrics(str(two))
  assert [m["step"] for m in two_metrics] == [m["step"] for m in one_metrics] == [1, 2, 3, 3]
  for one, other in zip(one_metrics, two_metrics):
    assert one.keys() == other.keys()
    # As floats: a value that is not finite is null in metrics.jsonl (None here, NaN as a float).
    np.testing.assert_allclose(np.array([other[k] for k in one], float),
                               np.array(list(one.values()), float), rtol=1e-5,
                               err_msg=f"metrics of step {one['step']}")

  # Restored in this process, on its 8 devices: the checkpoint written by two processes reshards.
  one_state = jax.device_get(train_lib.restore(str(tmp_path / "one"))[1])
  two_state = jax.device_get(train_lib.restore(str(two))[1])
  assert int(two_state.step) == steps
  # Gradients are sums over the batch with cancellation: compare each leaf to its own scale.
  jax.tree.map_with_path(
      lambda path, a, b: np.testing.assert_allclose(
          b, a, rtol=1e-5, atol=1e-5 * np.max(np.abs(a)), err_msg=jax.tree_util.keystr(path)),
      one_state, two_state)


def test_sigterm_to_one_process_stops_both_after_one_step_saved(tmp_path):
  """JAX's preemption service catches SIGTERM on either process and picks one step at which
  both save and stop, with train.py's exit status 143 (a single process catches SIGTERM itself:
  test_train.py)."""
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  logs.mkdir()
  processes = _start_processes(workdir, logs, num_steps=100_000, checkpoint_every=100_000,
                               micro_batches=1)
  try:
    deadline = time.monotonic() + _TIMEOUT_S
    while "step 1/" not in (logs / "stdout_0.txt").read_text():  # The loop runs.
      assert time.monotonic() < deadline and all(p.poll() is None for p in processes)
      time.sleep(0.2)
    processes[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=_TIMEOUT_S) for p in processes]
  finally:
    for p in processes:
      p.kill()
  stdout = (logs / "stdout_0.txt").read_text()
  assert codes == [143, 143], stdout[-3000:] + (logs / "stderr_1.txt").read_text()[-3000:]
  step = int(re.search(r"^Preempted: stopped at step (\d+) and saved it", stdout, re.M).group(1))
  assert os.listdir(workdir / "checkpoints") == [str(step)]
  for name in ("state/ocdbt.process_0", "state/ocdbt.process_1"):
    assert os.path.exists(workdir / "checkpoints" / str(step) / name), name


@pytest.mark.parametrize("case,process_0_error,process_1_error", [
    # One config check fails in process 1 alone: process 0 learns it and stops too.
    ("scale -1 on process 1", "Another process cannot start; its output says why.",
     "`scale` of ArcFace must be positive"),
    ("margin 0.3 on process 1", "The processes run different configs", None),
    ("separate workdirs", "is not one folder shared by all processes", None),
    ("process 0 cannot write its workdir", "Cannot write in --workdir",
     "Another process cannot start; its output says why."),
])
def test_processes_that_cannot_start_together_all_stop_at_once(
    tmp_path, case, process_0_error, process_1_error):
  # Each used to go on alone: a different config trained (a backbone of two seeds), a process
  # that stopped left the other waiting for a collective, a workdir not shared hung at the first
  # checkpoint for 20 minutes.
  logs = tmp_path / "logs"
  logs.mkdir()
  (tmp_path / "a_file").touch()
  process_args = {
      "scale -1 on process 1": ((), ["--config.loss.scale=-1"]),
      "margin 0.3 on process 1": ((), ["--config.loss.margin=0.3"]),
      "separate workdirs": ((), [f"--workdir={tmp_path / 'other'}"]),
      "process 0 cannot write its workdir": ([f"--workdir={tmp_path / 'a_file' / 'run'}"], ()),
  }[case]
  start = time.monotonic()
  processes = _start_processes(tmp_path / "run", logs, process_args)
  codes = [p.wait(timeout=_TIMEOUT_S) for p in processes]
  stderr = [(logs / f"stderr_{i}.txt").read_text() for i in range(2)]
  assert codes == [1, 1], stderr
  for text, error in zip(stderr, (process_0_error, process_1_error or process_0_error)):
    fatal = [line for line in text.splitlines() if line.startswith("FATAL")]
    assert len(fatal) == 1 and error in fatal[0], text[-3000:]
  assert "Traceback" not in "".join(stderr)
  assert time.monotonic() - start < 120  # Not a collective's timeout.
  assert not os.path.exists(tmp_path / "run" / "checkpoints")  # Nothing was built.
  assert not list(tmp_path.glob("*/.process_0_token_*"))  # Removed once read.
