"""The benchmark scripts run end to end on tiny sizes and print their tables.

Their figures are not checked (speed is measured, never asserted); this keeps the scripts the
README quotes from breaking as the library changes.
"""

import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")


def _benchmarks_module(name):
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}",
                                                os.path.join(BENCHMARKS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


common = _benchmarks_module("common")


def _completed(script, *args, **environment):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **environment)
  return subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), *args],
                        capture_output=True, text=True, env=env, timeout=600, check=False)


def _run(script, *args, **environment):
  """The standard output of a run of ``script`` that must succeed (``environment``: variables
  set for it)."""
  result = _completed(script, *args, **environment)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


def _table_rows(output, header="engine", columns=5):
  """``{first cell: [cells]}`` of the markdown rows in ``output`` of tables whose first column
  is ``header``, with ``columns`` cells (by default the rows of ``engines.py``'s tables)."""
  rows = {}
  for line in output.splitlines():
    cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
    if line.startswith("| ") and len(cells) == columns and cells[0] not in (header, "---"):
      rows[cells[0]] = cells
  return rows


def test_engines_prints_every_engine_against_the_floor():
  # bfloat16 alone: it has every row float32 has and one more; float32 tables are printed by
  # the tests of --max-temp-gb and of device_check.sh below.
  output = _run("engines.py", "--classes", "20000", "40000", "--batch", "8", "--dim", "16",
                "--repeats", "1", "--chunk-sizes", "128", "--dtypes", "bfloat16")
  assert output.count("| engine | time (ms) | / floor | XLA temp (MB) | in all (MB) |") == 2
  rows = _table_rows(output)  # The last table's: C = 40000, bfloat16.
  assert set(rows) == {"floor (3 matmuls)", "floor, float32 W cast to bfloat16",
                       "floor in chunks of 128", "dense", "chunked (128)",
                       "chunked (128), keep_scores=False", "sampled (r=0.1, chunked 128)",
                       "sampled rows only (r=0.1, chunked 128)", "sample and gather (r=0.1)"}
  assert rows["floor (3 matmuls)"][2] == "1.00x"
  target = re.findall(r"sampled rows only \(r=0.1, chunked 128\): (\d\.\d+)x the floor; 0.1 x "
                      r"chunked \(128\) \+ sample and gather \(r=0.1\): 0.1 x (\d+\.\d+)x \+ "
                      r"(\d\.\d+)x = (\d\.\d+)x", output)
  assert len(target) == 2  # One line a table.
  measured, full, gather, total = map(float, target[-1])
  assert float(rows["chunked (128)"][2][:-1]) == full
  assert abs(float(rows["sample and gather (r=0.1)"][2][:-1]) - gather) < 0.006
  assert abs(measured - float(rows["sampled rows only (r=0.1, chunked 128)"][2][:-1])) < 0.006
  assert abs(total - (0.1 * full + gather)) < 0.002
  for cells in rows.values():
    assert re.fullmatch(r"\d+\.\d\dx", cells[2]), cells
    assert float(cells[4]) >= float(cells[3])  # In all: temporaries, arguments and outputs.
  # W [40000, 16] and its gradient, 2.4 MB each in float32 (bfloat16 only in the matmuls), and
  # a few temporaries.
  assert 4.5 <= float(rows["chunked (128)"][4]) < 6
  assert "XLA temporaries by C (MB):" in output
  assert re.search(r"bfloat16 chunked \(128\): C=20,000: \d+, C=40,000: \d+", output)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_floor_gives_the_floors_products(dtype):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (6, 5), dtype)
  w = jax.random.normal(kw, (10, 5), dtype)  # Chunks of 4: two whole, one of 2.
  expected = jax.jit(common.floor)(x, w)
  got = jax.jit(common.chunked_floor, static_argnums=2)(x, w, 4)
  for e, g in zip(expected, got):
    assert g.dtype == e.dtype
    np.testing.assert_allclose(np.float32(g), np.float32(e), rtol=1e-5 if dtype == jnp.float32
                               else 1e-2, atol=1e-5)


@pytest.mark.parametrize("matmul_dtype", [None, jnp.bfloat16])
def test_floor_is_three_matmuls_in_the_stated_dtypes(matmul_dtype):
  x, w = jnp.ones((8, 16)), jnp.ones((100, 16))
  inputs = (x, w) if matmul_dtype is None else (x.astype(matmul_dtype), w.astype(matmul_dtype))
  compiled = jax.jit(common.floor).lower(*inputs).compile()
  assert len(re.findall(r"\bdot\(", compiled.as_text())) == 3
  dx, dw = jax.jit(common.floor)(*inputs)
  assert (dx.shape, dw.shape) == (x.shape, w.shape)
  assert dx.dtype == dw.dtype == inputs[0].dtype
  # The engines' bfloat16 case: float32 W in, cast for the matmuls, float32 gradients out.
  dx, dw = jax.jit(lambda x, w: common.floor(x, w, jnp.bfloat16))(x, w)
  assert dx.dtype == dw.dtype == jnp.float32


def test_memory_bytes_counts_donated_state_once():
  x = jnp.ones((1024, 256))  # 1 MiB
  step = lambda s, b: (s * 2 + b.sum(), b.mean())  # noqa: E731
  kept = jax.jit(step).lower(x, x).compile()
  donated = jax.jit(step, donate_argnums=0).lower(x, x).compile()
  assert common.memory_bytes(kept)[1] - common.memory_bytes(donated)[1] == x.nbytes


def test_measure_gives_the_median_of_per_round_ratios(monkeypatch):
  monkeypatch.syspath_prepend(BENCHMARKS)
  engines = _benchmarks_module("engines")
  rounds = {"floor": [1.0, 1.0, 10.0], "engine": [3.0, 1.0, 20.0]}  # Ratios 3, 1, 2.
  monkeypatch.setattr(engines.common, "interleaved",
                      lambda timers, repeats: {name: rounds[name] for name in timers})
  measured = engines.measure({"floor": (None, ()), "engine": (None, ())}, 3)
  assert measured["engine"] == (3.0, 2.0)  # Not 3.0, the ratio of the medians.
  assert measured["floor"] == (1.0, 1.0)


def test_engines_gives_no_ratio_when_the_floor_is_skipped():
  output = _run("engines.py", "--classes", "20000", "--batch", "8", "--dim", "16", "--repeats",
                "1", "--chunk-sizes", "128", "--dtypes", "float32", "--max-temp-gb", "0.0004")
  rows = _table_rows(output)
  assert rows["floor (3 matmuls)"][1] == "skipped"
  assert all(cells[2] == "-" for cells in rows.values()), rows


# Imported first by every Python process that has its folder on the path: the training
# packages are then missing, as on an accelerator's image (the H200's lacked grain and
# ml-collections, and its flax did not import).
_WITHOUT_TRAINING_PACKAGES = '''
import importlib.abc, sys
class _Missing(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.partition(".")[0] in ("flax", "grain", "ml_collections", "optax"):
      raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _Missing())
'''


def test_device_check_runs_engines_without_the_training_packages(tmp_path):
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(_WITHOUT_TRAINING_PACKAGES)
  env = dict(os.environ, JAX_PLATFORMS="cpu", CLASSES="3000", PROFILE_CLASSES="2000",
             OUT=str(tmp_path), PYTHON=sys.executable, PYTHONPATH=str(site))
  command = ["bash", os.path.join(BENCHMARKS, "device_check.sh"), "--batch", "8", "--dim", "16",
             "--repeats", "1", "--dtypes", "float32"]
  # On a CPU it stops unless told the CPU will do, as it does if nothing runs at all.
  for stop_env, message in ((env, "JAX found no accelerator"), (dict(env, PYTHON="false"), "")):
    result = subprocess.run(command, capture_output=True, text=True, env=stop_env, timeout=600,
                            check=False)
    assert result.returncode == 1 and message in result.stderr, result.stderr[-4000:]
  assert os.listdir(tmp_path) == ["site"]  # Nothing written.
  result = subprocess.run(command, capture_output=True, text=True, env=dict(env, CPU_OK="1"),
                          timeout=600, check=False)
  # The engines ran; the training step could not, which the exit status says.
  assert result.returncode == 1, result.stderr[-4000:]
  assert result.stdout.startswith("jax ")
  with open(tmp_path / "engines.txt") as log:
    output = log.read()
  assert "C=3,000, B=8, D=16, float32, 1 interleaved rounds" in output
  assert {"floor (3 matmuls)", "chunked (65536)", "chunked (8192)"} <= set(_table_rows(output))
  assert "training step skipped: margins.train_lib does not import" in result.stderr
  with open(tmp_path / "train_step.txt") as log:
    assert log.read().startswith("training step skipped")
  # The profile's table and where its time goes, appended; its traces beside.
  assert "C=2,000, B=8, D=16, float32, 1 interleaved rounds" in output
  assert "Where the time goes" in output
  assert "C2000_float32_chunked_65536.trace.json.gz" in os.listdir(tmp_path / "traces")


def test_train_step_prints_a_recipes_step_and_its_head():
  # On 2 devices, the head split over them; 4097 classes pad to 4098 rows, 2049 per device. One
  # run, a table each way: updating every row, then the sampled rows alone.
  output = _run("train_step.py", "--recipe", "ms1mv3_r50", "--quick", "--classes", "4097",
                "--batch", "8", "--steps", "1", "--repeats", "1", "--sample-rate", "0.5",
                "--chunk-size", "128", "--freeze-unsampled", "both",
                JAX_NUM_CPU_DEVICES="2")
  tables = re.split(r"^(?=jax )", output, flags=re.M)[1:]
  assert len(tables) == 2, output
  for freeze_unsampled, table in zip((False, True), tables):
    assert ("recipe ms1mv3_r50: iresnet18, arcface, engine sharded (chunk 128, sample rate 0.5, "
            f"freeze_unsampled {freeze_unsampled}), float32, sgd, global batch 8") in table, table
    row = re.search(r"^\| 4,097 \| (.*) \|$", table, re.M)
    assert row, table
    images, step, head, floor, ratio, share, memory, head_memory, losses = (
        cell.strip() for cell in row.group(1).split("|"))
    assert abs(float(images) - 8 / (float(step) / 1e3)) <= 1, table  # images/s of the step
    assert float(head) > 0 and float(floor) > 0, table
    assert re.fullmatch(r"\d+\.\d\dx", ratio) and re.fullmatch(r"\d+%", share), table
    # A device's rows of W [4098, 64] and their SGD momentum, 0.5 MB each in float32, within
    # what the step holds on that device.
    assert head_memory == "1" and float(memory) > 1, table
    assert all(np.isfinite(float(loss)) for loss in losses.split(", ")), table
    assert re.search(r"^C=4,097: state created in \d+\.\d s \(its programs compiled and run\), "
                     r"step compiled in \d+\.\d s$", table, re.M), table


def test_checkpoint_save_compares_the_runs_checkpoints_with_orbaxs_default():
  output = _run("checkpoint_save.py", "--recipe", "ms1mv3_mbf", "--quick", "--classes", "100",
                "--repeats", "1", "--cpu-devices", "2")
  assert re.search(r"mobilefacenet, 100 classes, sgd: \d+ arrays, .* split by margins where a "
                   r"device's share is >= 8 MB: 0$", output, re.M), output
  rows = _table_rows(output, "saver", columns=6)
  assert set(rows) == {"margins", "orbax default"}, output
  # saver, first save (s), programs compiled, compiling (s), later saves (s), later / margins'
  assert rows["margins"][2:4] == ["0", "0.00"] and rows["margins"][5] == "1.00x", output
  assert int(rows["orbax default"][2]) > 0, output  # a program per replicated array's share
  assert re.fullmatch(r"\d+\.\d\dx", rows["orbax default"][5]), output


def test_engines_profile_names_each_programs_ops_and_their_calls(tmp_path):
  output = _run("engines.py", "--classes", "2000", "--batch", "8", "--dim", "16", "--repeats",
                "1", "--chunk-sizes", "128", "--dtypes", "float32", "--profile", "--trace-dir",
                str(tmp_path))
  sections = output.split("\n\n")
  chunked = next(s for s in sections if s.startswith("chunked (128): "))
  assert re.match(r"chunked \(128\): \d+ ms per run under the profiler; its XLA ops from "
                  r"matmuls \d+ ms, from the rest \d+ ms\n", chunked)
  ops = re.findall(r"^ +\d+\.\d ms +(\d+) calls  \S+ \((\S+)\)$", chunked, re.M)
  assert len(ops) == 8
  # 2000 classes: 15 full chunks of 128 per loop (the remainder has ops of its own); three
  # matmuls per chunk, a loop's ops called once per chunk, no loop counted as an op.
  assert ("15", "dot_general") in ops and all(calls in ("1", "15") for calls, _ in ops)
  assert "(while)" not in output
  # Each program's trace, kept under a name made of the table's C and dtype and the program's.
  assert sorted(os.listdir(tmp_path)) == sorted(
      f"C2000_float32_{name}.trace.json.gz" for name in (
          "floor_3_matmuls", "floor_in_chunks_of_128", "dense", "chunked_128",
          "chunked_128_keep_scores_False", "sampled_r_0.1_chunked_128",
          "sampled_rows_only_r_0.1_chunked_128", "sample_and_gather_r_0.1"))
  with gzip.open(tmp_path / "C2000_float32_chunked_128.trace.json.gz") as trace:
    assert any(event.get("ph") == "X" for event in json.load(trace)["traceEvents"])


def test_profile_counts_an_accelerators_kernels_not_the_hosts_launches(monkeypatch):
  monkeypatch.syspath_prepend(BENCHMARKS)  # engines.py imports common.py beside it.
  engines = _benchmarks_module("engines")
  names = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
           for pid, name in ((1, "/host:CPU"), (2, "/device:GPU:0"))]
  host = {"ph": "X", "pid": 1, "name": "launch", "dur": 5, "args": {"hlo_op": "fusion.1"}}
  kernel = {"ph": "X", "pid": 2, "name": "loop_fusion", "dur": 9, "args": {"hlo_op": "fusion.1"}}
  assert engines.device_events([*names, host, kernel]) == [kernel]
  assert engines.device_events([names[0], host]) == [host]  # A CPU's trace: all its events.


def test_engines_sharded_prints_the_collectives():
  output = _run("engines.py", "--sharded", "2", "--classes", "601", "--batch", "8", "--dim",
                "16", "--repeats", "1", "--chunk-sizes", "128", "--dtypes", "float32")
  rows = _table_rows(output)
  assert set(rows) == {"floor (3 matmuls, 1 device)", "chunked (128, 1 device)",
                       "sharded (2 devices, chunk 128)"}
  # 601 classes pad to 602 rows, 301 per device.
  assert "W per device: 301 rows" in output
  collectives = re.search(r"collectives in the compiled sharded program \(arrays per device\): "
                          r"(.*)", output)
  # The embeddings gathered, their gradient reduce-scattered back: 4 of the 8 rows each.
  assert collectives and "all-gather f32[8,16] x1" in collectives.group(1), output
  assert "reduce-scatter f32[4,16] x1" in collectives.group(1), output


def test_losses_prints_the_zoo_without_torch():
  output = _run("losses.py", "--no-torch", "--classes", "50", "--batch", "8", "--dim", "16",
                "--identities", "4", "--repeats", "1", "--losses", "arcface",
                "triplet batch-hard")
  assert re.search(r"^\| arcface \| [\d.]+ \| \d+\.\d\dx \|", output, re.MULTILINE), output
  assert re.search(r"^\| triplet batch-hard \| [\d.]+ \|", output, re.MULTILINE), output


def test_losses_rejects_an_unknown_loss():
  result = _completed("losses.py", "--no-torch", "--losses", "triplet")
  assert result.returncode != 0 and "invalid choice: 'triplet'" in result.stderr


def test_input_pipeline_prints_images_per_second():
  output = _run("input_pipeline.py", "--images", "24", "--classes", "3", "--size", "24",
                "--batch", "8", "--batches", "2", "--workers", "0")
  assert re.search(r"^\| 0 \| [\d,]+ \|$", output, re.MULTILINE), output


def test_ijb_prints_reading_speed_and_scoring_cost():
  output = _run("ijb.py", "--images", "300", "--templates", "40", "--pairs", "500",
                "--same-pairs", "50", "--dim", "8", "--crops", "40", "--crop-size", "64")
  assert re.search(r"1 read thread\(s\): [\d,]+ images/s", output), output
  assert re.search(r"evaluate_ijb, 300 images, \d+ templates, 500 pairs, 8-d: [\d.]+ s", output)
  assert "[random features] TAR@FAR=1e-06: n/a" in output, output
