#!/usr/bin/env bash
# Every GPU measurement of the project in one unattended run: each part under its own time budget, all inside
# LIMIT seconds, results and logs under $OUT (parts.txt says what ran, how long, and its exit status).
#
#   on a GPU machine (see README, "Speed"):   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#   this script's own check on a CPU:          QUICK=1 OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#
# Order = what matters most first: the number format (it decides --dtype auto), the whole job, the CRF,
# the engine, training.
set -u
OUT=${OUT:-/tmp/gpu-check}
LIMIT=${LIMIT:-560}
QUICK=${QUICK:-0}
PARTS=${PARTS:-precision infer crf engine train}  # a subset when device time is short
mkdir -p "$OUT"
start=$(date +%s)
if [ -f .devkit/on-device.sh ]; then source .devkit/on-device.sh; fi
PY=${PY:-python3}
export PYTHONPATH=".:benchmarks:${PYTHONPATH:-}"

left() { echo $(( LIMIT - ($(date +%s) - start) )); }
part() {  # part NAME BUDGET_S command...
  local name=$1 budget=$2; shift 2
  case " $PARTS " in *" $name "*) ;; *) echo "$name not asked for" >> "$OUT/parts.txt"; return ;; esac
  local rest; rest=$(left)
  local b=$(( budget < rest ? budget : rest ))
  if [ "$b" -lt 15 ]; then echo "$name skipped (no time left)" >> "$OUT/parts.txt"; return; fi
  local t0; t0=$(date +%s)
  timeout -k 5 "$b" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 ))s (budget ${b}s)" >> "$OUT/parts.txt"
}

{ date; nvidia-smi 2>&1 | head -15; $PY -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.cuda.is_available())'
  nproc; free -g; } > "$OUT/env.txt" 2>&1
echo "setup $(( $(date +%s) - start ))s" >> "$OUT/parts.txt"

if [ "$QUICK" = 1 ]; then
  DEV=cpu; TINY=--tiny
  part precision 200 $PY benchmarks/bench_precision.py --device cpu --tiny --limit 3 --formats float32 float16 --out "$OUT"
  CHOICE=float32
  part infer 300 $PY benchmarks/bench_infer.py --device cpu --tiny --groups 4 --per-group 4 --crf none coca \
    --dtype $CHOICE --work /tmp/gpu-check-infer --out "$OUT"
  part crf 200 $PY benchmarks/bench_crf.py --check --device cpu --quick --out "$OUT/crf"
  part engine 200 $PY benchmarks/bench_engine.py --device cpu --tiny --groups 3 --group-size 4 --crf none --out "$OUT"
  part train 300 $PY benchmarks/bench_train.py --device-check --quick --out "$OUT/train"
else
  part precision ${PRECISION_S:-110} $PY benchmarks/bench_precision.py --device cuda --formats ${FORMATS:-float32 tf32 float16 bfloat16} --out "$OUT"
  CHOICE=$($PY -c "import json; print(json.load(open('$OUT/precision.json'))['auto_choice'])" 2>/dev/null || echo float16)
  echo "precision choice: $CHOICE" >> "$OUT/parts.txt"
  part infer ${INFER_S:-170} $PY benchmarks/bench_infer.py --device cuda --groups 200 --per-group 25 --crf none coca \
    --dtype "$CHOICE" --work /tmp/gpu-check-infer --out "$OUT"
  part crf 75 $PY benchmarks/bench_crf.py --check --device cuda --out "$OUT/crf"
  part engine 60 $PY benchmarks/bench_engine.py --device cuda --groups 40 --group-size 25 --precisions "$CHOICE" \
    --crf none coca --repeat 2 --out "$OUT"
  part train 130 $PY benchmarks/bench_train.py --device-check --out "$OUT/train"
fi
ls /tmp/ray/session_latest/logs > "$OUT/ray-logs.txt" 2>/dev/null
echo "total $(( $(date +%s) - start ))s" >> "$OUT/parts.txt"
cat "$OUT/parts.txt"
