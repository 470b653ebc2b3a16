#!/usr/bin/env bash
# The accelerator figures in one run, for a machine lent for a few minutes:
#  1. issue 3's engines against the matmul floor at C = 1M, 2M and 4M (B = 256, D = 512),
#     float32 and bfloat16, with the memory each program needs; chunks of 65,536 classes (the
#     scores of one chunk: 64 MB) and of 8,192;
#  2. where the time goes at C = 4M (PROFILE_CLASSES) with bfloat16 matmuls in chunks of 65,536
#     (engines.py --profile), each program's trace kept in $OUT/traces to read offline
#     (PROFILE=0 skips it);
#  3. the training step of two recipes on random device-resident batches of 512: IResNet-50 with
#     MS1MV3's 93,431 classes, and IResNet-100 with Partial FC (r = 0.2) over WebFace42M's
#     2,059,906 classes, that one also updating the sampled rows alone (--freeze-unsampled)
#     (benchmarks/train_step.py), if margins.train_lib imports (flax, optax, orbax, grain ...).
#     On an H200 (2026-12-04) IResNet-100's initialisation program was still compiling for the GPU
#     after 100 s; it now compiles for the host's CPU (8 s here), which the state's creation
#     time in train_step.txt should show.
# Uses the machine's own JAX (an accelerator build; the pinned CPU wheels are not installed
# there). The engines and the profile each stop after ENGINES_TIMEOUT seconds, each recipe after
# TRAIN_TIMEOUT (default: no limit). Everything lands in $OUT: engines.txt (the profile's
# tables appended), train_step.txt and nine traces (one per program profiled), eleven files.
#
#   bash benchmarks/device_check.sh                  # output also under $OUT if set
#   CPU_OK=1 CLASSES=20000 PROFILE_CLASSES=20000 TRAIN=0 bash benchmarks/device_check.sh  # any
#
# Further arguments go to both runs of engines.py (e.g. --repeats 3; --dtypes changes the
# profile's too); PYTHON picks the interpreter (python3). JAX must find an accelerator unless
# CPU_OK=1. A step that fails or times out is reported (in the output files too) and the others
# still run; the script then exits 1.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-$(mktemp -d)}"
python="${PYTHON:-python3}"
status=0
stopped() {  # stopped FILE MESSAGE: a failed step, said where its output goes.
  echo "$2" | tee -a "$1" >&2
  status=1
}
"$python" -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1
if [ "${CPU_OK:-0}" != 1 ] && "$python" -c \
    "import jax, sys; sys.exit(jax.default_backend() != 'cpu')"; then
  echo "JAX found no accelerator (its backend is the CPU); set CPU_OK=1 to run there." >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv \
  2>/dev/null
# shellcheck disable=SC2086  # CLASSES is a list of numbers
timeout "${ENGINES_TIMEOUT:-0}" "$python" benchmarks/engines.py \
  --classes ${CLASSES:-1000000 2000000 4000000} --chunk-sizes 65536 8192 --max-temp-gb 60 \
  --repeats 5 "$@" 2>&1 | tee "$out/engines.txt" \
  || stopped "$out/engines.txt" "engines.py stopped: exit ${PIPESTATUS[0]}"
if [ "${PROFILE:-1}" = 1 ]; then
  timeout "${ENGINES_TIMEOUT:-0}" "$python" benchmarks/engines.py \
    --classes "${PROFILE_CLASSES:-4000000}" --dtypes bfloat16 --chunk-sizes 65536 --repeats 1 \
    --max-temp-gb 60 --profile --trace-dir "$out/traces" "$@" 2>&1 | tee -a "$out/engines.txt" \
    || stopped "$out/engines.txt" "engines.py --profile stopped: exit ${PIPESTATUS[0]}"
fi
[ "${TRAIN:-1}" = 1 ] || exit "$status"
if ! "$python" -c "import margins.train_lib"; then
  stopped "$out/train_step.txt" \
    "training step skipped: margins.train_lib does not import (above; a package is missing?)"
  exit 1
fi
for case in "ms1mv3_r50 93431" "webface42m_r100_pfc 2059906" \
    "webface42m_r100_pfc 2059906 --freeze-unsampled"; do
  read -r recipe classes flags <<<"$case"
  # shellcheck disable=SC2086  # flags: none or one
  timeout "${TRAIN_TIMEOUT:-0}" "$python" benchmarks/train_step.py --recipe "$recipe" \
    --classes "$classes" --batch 512 $flags 2>&1 | tee -a "$out/train_step.txt" \
    || stopped "$out/train_step.txt" "train_step.py stopped: exit ${PIPESTATUS[0]}"
done
exit "$status"
