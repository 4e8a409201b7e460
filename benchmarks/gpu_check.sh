#!/usr/bin/env bash
# Every GPU measurement of the project in one unattended run: each part under its own time budget, all inside
# LIMIT seconds, results and logs under $OUT (parts.txt says what ran, how long, and its exit status).
#
#   on a GPU machine (see README, "Speed"):   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#   this script's own check on a CPU:          QUICK=1 OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#
# Parts run in the order PARTS gives (default: all, the number format first, since it decides the format the
# job and the engine run in). At most 10 minutes a call: on an H100 all five need about 12, so split them, e.g.
#   PARTS="engine train" LIMIT=560 OUT=$OUT/gpu bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu-check}
LIMIT=${LIMIT:-560}
QUICK=${QUICK:-0}
PARTS=${PARTS:-precision infer crf engine train}  # a subset when device time is short
mkdir -p "$OUT"
start=$(date +%s)
if [ -z "${PY:-}" ] && [ -f .devkit/on-device.sh ]; then source .devkit/on-device.sh; fi  # PY given: its own packages
PY=${PY:-python3}
export PYTHONPATH=".:benchmarks:${PYTHONPATH:-}"

left() { echo $(( LIMIT - ($(date +%s) - start) )); }
part() {  # part NAME BUDGET_S command...
  local name=$1 budget=$2; shift 2
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

# the format the job and the engine run in: precision's choice when it ran first, else --dtype auto's on CUDA
choice() {
  $PY -c "import json; print(json.load(open('$OUT/precision.json'))['auto_choice'])" 2>/dev/null \
    || $PY -c "from scosparc_core.precision import resolve; print(resolve('auto', 'cuda'))"
}
if [ "$QUICK" = 1 ]; then
  precision() { part precision 200 $PY benchmarks/bench_precision.py --device cpu --tiny --limit 3 --formats float32 float64 --out "$OUT"; }
  infer() { part infer 300 $PY benchmarks/bench_infer.py --device cpu --tiny --groups 4 --per-group 4 --crf none coca \
    --dtype float32 --work /tmp/gpu-check-infer --out "$OUT"; }
  crf() { part crf 200 $PY benchmarks/bench_crf.py --check --device cpu --quick --out "$OUT/crf"; }
  engine() { part engine 200 $PY benchmarks/bench_engine.py --device cpu --tiny --groups 3 --group-size 4 --crf none --out "$OUT"; }
  train() { part train 300 $PY benchmarks/bench_train.py --device-check --quick --out "$OUT/train"; }
else
  precision() {
    part precision ${PRECISION_S:-140} $PY benchmarks/bench_precision.py --device cuda --formats ${FORMATS:-float32 float64 float16 tf32 bfloat16} --out "$OUT"
    echo "precision choice: $(choice)" >> "$OUT/parts.txt"; }
  infer() { part infer ${INFER_S:-190} $PY benchmarks/bench_infer.py --device cuda --groups 200 --per-group 25 --crf none coca \
    --dtype "$(choice)" --work /tmp/gpu-check-infer --out "$OUT"; }
  crf() { part crf ${CRF_S:-75} $PY benchmarks/bench_crf.py --check --device cuda --out "$OUT/crf"; }
  # 40 groups in two rounds: 8 calls for the two threads (3 calls left the first and last without overlap);
  # 60 s was too little for it on an H100
  engine() { part engine ${ENGINE_S:-150} $PY benchmarks/bench_engine.py --device cuda --groups 40 --group-size 25 \
    --precisions "$(choice)" --crf none coca --repeat 2 --out "$OUT"; }
  # three jobs/train.py runs, each starting Ray and Ray Train: about 4 minutes on an H100 (175 s was not enough)
  train() {
    local b=${TRAIN_S:-310} rest; rest=$(left); b=$(( b < rest ? b : rest ))
    part train "$b" $PY benchmarks/bench_train.py --device-check --budget $(( b - 10 )) --out "$OUT/train"; }
fi
for name in $PARTS; do  # in the order PARTS gives
  case $name in precision|infer|crf|engine|train) $name ;; *) echo "$name: no such part" >> "$OUT/parts.txt" ;; esac
done
ls /tmp/ray/session_latest/logs > "$OUT/ray-logs.txt" 2>/dev/null
echo "total $(( $(date +%s) - start ))s" >> "$OUT/parts.txt"
cat "$OUT/parts.txt"
