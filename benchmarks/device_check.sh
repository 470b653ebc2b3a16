#!/usr/bin/env bash
# Issue 3's accelerator figures in one run, for a machine lent for a few minutes: the engines
# against the matmul floor at C = 1M, 2M and 4M (B = 256, D = 512), float32 and bfloat16, with
# the memory each program needs. Uses the machine's own JAX (an accelerator build; the pinned CPU
# wheels are not installed there): `margins` and this benchmark need only jax and numpy.
#
#   bash benchmarks/device_check.sh                  # output also in $OUT/engines.txt if set
#   CLASSES="20000" bash benchmarks/device_check.sh  # a quick try on any machine
#
# Further arguments go to engines.py (e.g. --profile); PYTHON picks the interpreter (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="${OUT:-$(mktemp -d)}/engines.txt"
python="${PYTHON:-python3}"
"$python" -c "import jax; print('jax', jax.__version__, jax.devices())"
# shellcheck disable=SC2086  # CLASSES is a list of numbers
"$python" benchmarks/engines.py --classes ${CLASSES:-1000000 2000000 4000000} --chunk-sizes 8192 \
  --max-temp-gb 60 --repeats 5 "$@" 2>&1 | tee "$log"
