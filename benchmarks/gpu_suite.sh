#!/usr/bin/env bash
# Runs the accelerator benchmarks in one go and writes their JSON.
#
#   benchmarks/gpu_suite.sh [--tiny] [--out DIR] [--skip NAME]...
#
# Parts (each under its own time limit, together under 5 minutes on one
# accelerator at the default sizes):
#   fedjax      benchmarks.fedjax_comparison: FedJAX fed_avg vs ours, the
#               existing rows and the stock-layer rows, GFLOP/s vs the
#               measured matmul peak           -> DIR/fedjax_comparison.json
#   quant       benchmarks.quant_step: int8 fwd+bwd step vs float32 (and
#               AQT where installed)           -> DIR/quant_step.json
#   step        benchmarks.client_step_cost: the main job's client step
#               (DS-CNN S, batch 8), GFLOP/s as a fraction of the peak and
#               its largest ops                -> DIR/client_step_cost.json
#   main_job    benchmarks.fed_kws_report --mode=time: seconds per round of
#               configs/fed_kws.py (needs the speech-keyword corpus, which
#               is synthesised on first use)   -> DIR/fed_kws_time.json
# --tiny shrinks every part to a smoke run (seconds to a minute each on a
# CPU), to check the script itself. Every JSON records the device, so a
# result says which card measured it. Exit status: the number of failed
# parts.
set -u

OUT="benchmarks/results/gpu_suite/$(date +%Y%m%d_%H%M%S)"
TINY=0
SKIP=" "
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tiny) TINY=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --skip) SKIP="${SKIP}$2 "; shift 2 ;;
    *) echo "unknown argument $1; see the header of $0" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python
FAILED=0

run_part() {  # name, seconds, command...
  local name="$1" limit="$2"; shift 2
  if [[ "$SKIP" == *" $name "* ]]; then
    echo "== $name: skipped"; return
  fi
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "== $name: done in $((SECONDS - start))s"
  else
    echo "== $name: FAILED (status $?) after $((SECONDS - start))s;" \
         "see $OUT/$name.log"
    tail -5 "$OUT/$name.log"
    FAILED=$((FAILED + 1))
  fi
}

if [[ $TINY == 1 ]]; then
  FEDJAX_FLAGS=(--models=mlp_2k --rounds=2 --warmup=1 --seeds=1
                --stock_models=stock_cnn_5k,dense_25k --stock_cohort=4x16
                --stock_rounds=2)
  QUANT_FLAGS=(--repeats=2 --iters=1 --skip_dscnn)
  STEP_FLAGS=(--repeats=3 --profile_steps=2)
  MAIN_FLAGS=(--rounds=1 --steps=2 --override=cohort_size=2
              --override=local.num_steps=2 --override=data.num_speakers=10
              --override=data.utterances_per_word=1)
  LIMITS=(240 120 120 300)
else
  FEDJAX_FLAGS=(--rounds=6 --seeds=1 --stock_rounds=6)
  QUANT_FLAGS=(--repeats=5)
  STEP_FLAGS=(--repeats=30 --profile_steps=10)
  MAIN_FLAGS=(--rounds=5 --steps=20)
  LIMITS=(120 60 30 90)
fi

run_part fedjax "${LIMITS[0]}" "$PY" -m benchmarks.fedjax_comparison \
  "${FEDJAX_FLAGS[@]}" --out="$OUT/fedjax_comparison.json"
run_part quant "${LIMITS[1]}" "$PY" -m benchmarks.quant_step \
  "${QUANT_FLAGS[@]}" --out="$OUT/quant_step.json"
run_part step "${LIMITS[2]}" "$PY" -m benchmarks.client_step_cost \
  "${STEP_FLAGS[@]}" --out="$OUT/client_step_cost.json"
run_part main_job "${LIMITS[3]}" "$PY" -m benchmarks.fed_kws_report \
  --mode=time "${MAIN_FLAGS[@]}" --out="$OUT/fed_kws_time.json"

"$PY" -c "import jax; print('device:', jax.devices()[0].device_kind)" \
  > "$OUT/device.txt" 2>/dev/null
echo "results in $OUT ($(cat "$OUT/device.txt" 2>/dev/null)); $FAILED failed"
exit "$FAILED"
