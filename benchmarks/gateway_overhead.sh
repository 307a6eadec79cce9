#!/usr/bin/env bash
# Gateway overhead: what `tandem gateway` adds (latency, CPU per token) in front
# of two fake Tandem workers, measured with the recipe and the load generator
# of /work/shared/peers/sglang-router (run.sh, loadgen.py), side by side with
#   direct  loadgen straight to one fake SGLang worker (HTTP, the peers'
#           fake_worker.py): the baseline the "added" latency is taken against
#   tandem  loadgen -> tandem gateway (REST /generate, round_robin) -> 2 fake
#           Tandem workers (benchmarks/fake_worker.py; their framed TCP decode
#           stream, or gRPC with GATEWAY_ARGS="--decode-transport grpc")
#   sglang  loadgen -> sglang-router 0.3.2 (round_robin) -> 2 fake SGLang
#           workers; only if its venv exists ($VENV_SGLANG; the peers' run.sh
#           makes it: python3 -m venv $V; $V/bin/pip install sglang-router==0.3.2 aiohttp uvloop)
#   direct-grpc  benchmarks/grpc_loadgen.py (loadgen.py's figures over the Worker
#           protocol, on the transport the gateway would pick; GRPC_LOADGEN_ARGS
#           "--transport grpc" forces gRPC) straight to one fake Tandem worker:
#           the Tandem gateway's own baseline, its workers' path without it
#           (keep-alive cells only)
#   relay   (not in the default TARGETS) loadgen -> benchmarks/relay_floor.py -> 1
#           fake Tandem worker: the least a Python gateway on uvicorn adds here
#   direct2 (not in the default TARGETS) loadgen to both fake SGLang workers in turn
# Cells: -c 1 -r 200 and -c 256 -r 2000, -n 64 tokens, keep-alive and
# --fresh-conn, REPS times each, interleaved: every target's processes are up
# the whole time and each cell runs once per target before the next. Everything
# on 127.0.0.1.
#
#   bash benchmarks/gateway_overhead.sh                 # ~2-3 min on 2 cores
#   REPS=1 TARGETS="direct tandem" bash benchmarks/gateway_overhead.sh
#
# Variables (all optional):
#   VENV         Tandem's venv (aiohttp, uvloop, grpc, `tandem`)  (default: <repo>/.venv)
#   VENV_SGLANG  sglang-router's venv                (default: /tmp/sglang_router_venv)
#   PEERS        the sglang-router peer folder       (default: /work/shared/peers/sglang-router)
#   OUT          results folder                      (default: benchmarks/results)
#   LOGDIR       process logs                        (default: ${TMPDIR:-/tmp}/tandem_gateway_bench_logs)
#   BASE         first port (default 18400): gateway HTTP BASE, gateway gRPC BASE+51, relay BASE+52,
#                fake Tandem workers BASE+61/62, fake SGLang workers BASE+71/72,
#                sglang-router BASE+80 (metrics BASE+90)
#   REPS         repetitions per cell (default 3)
#   TARGETS      default "direct direct-grpc tandem sglang"
#   SETTINGS     default "c1 c256";  MODES: default "keepalive fresh"
#   POLICY       the gateway's policy (default round_robin)
#   GATEWAY_ARGS extra arguments for `tandem gateway`
#   APPEND=1     append to the raw file instead of starting it afresh
# Output: $OUT/gateway_overhead_raw.jsonl (loadgen's JSON lines, tagged
# target/setting/mode/rep) and $OUT/gateway_overhead.md (summarize_gateway.py).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
VENV_SGLANG="${VENV_SGLANG:-/tmp/sglang_router_venv}"
PEERS="${PEERS:-/work/shared/peers/sglang-router}"
OUT="${OUT:-$HERE/results}"
LOGDIR="${LOGDIR:-${TMPDIR:-/tmp}/tandem_gateway_bench_logs}"
BASE="${BASE:-18400}"
REPS="${REPS:-3}"
TARGETS="${TARGETS:-direct direct-grpc tandem sglang}"
SETTINGS="${SETTINGS:-c1 c256}"
MODES="${MODES:-keepalive fresh}"
POLICY="${POLICY:-round_robin}"
GATEWAY_ARGS="${GATEWAY_ARGS:-}"
G_PORT=$BASE; GG_PORT=$((BASE + 51)); RL_PORT=$((BASE + 52))
T1_PORT=$((BASE + 61)); T2_PORT=$((BASE + 62))
S1_PORT=$((BASE + 71)); S2_PORT=$((BASE + 72))
R_PORT=$((BASE + 80)); M_PORT=$((BASE + 90))
PY="$VENV/bin/python"
RAW="$OUT/gateway_overhead_raw.jsonl"
mkdir -p "$OUT" "$LOGDIR"
[ "${APPEND:-0}" = 1 ] || : > "$RAW"
: > "$LOGDIR/status.txt"

"$PY" -c "import aiohttp, uvloop, grpc" || {
  echo "$VENV lacks aiohttp/uvloop/grpc: $VENV/bin/pip install -e '$ROOT[bench]'" >&2; exit 1; }
[ -f "$PEERS/loadgen.py" ] || { echo "no $PEERS/loadgen.py" >&2; exit 1; }
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"

# ---- process helpers (every process is stopped by its own PID) -------------
PIDS=()
stop_pid() {  # SIGINT, then SIGTERM, then SIGKILL, each to this PID only
  local pid=$1 i sig
  kill -0 "$pid" 2>/dev/null || return 0
  for sig in INT TERM KILL; do
    kill -s "$sig" "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  done
}
cleanup() { local p; for p in "${PIDS[@]}"; do stop_pid "$p"; done; }
trap cleanup EXIT

wait_http() {  # url, tries (0.1 s each)
  local i
  for i in $(seq "${2:-100}"); do
    curl -sf -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "timeout waiting for $1" >&2; return 1
}

wait_log() {  # file, pattern, pid, tries
  local i
  for i in $(seq "${4:-100}"); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || { echo "process $3 died; see $1" >&2; tail -5 "$1" >&2; return 1; }
    sleep 0.1
  done
  echo "timeout waiting for '$2' in $1" >&2; return 1
}

descendants() {  # pids of all descendants of $1 (a gateway may fork helpers)
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done
}

record_status() {  # name, pid
  { echo "$1: $(grep -E '^(VmRSS|VmHWM|Threads)' "/proc/$2/status" | tr -s ' \t' ' ' | paste -sd' ')"; } \
    >> "$LOGDIR/status.txt" 2>/dev/null || true
}

LAST_PID=""
start_tandem_worker() {  # port
  "$PY" "$HERE/fake_worker.py" --host 127.0.0.1 --port "$1" > "$LOGDIR/tworker_$1.log" 2>&1 &
  LAST_PID=$!; PIDS+=("$LAST_PID")
  wait_log "$LOGDIR/tworker_$1.log" "listening on" "$LAST_PID" 200
}
start_sglang_worker() {  # port
  "$PY" "$PEERS/fake_worker.py" --host 127.0.0.1 --port "$1" > "$LOGDIR/sworker_$1.log" 2>&1 &
  LAST_PID=$!; PIDS+=("$LAST_PID")
  wait_http "http://127.0.0.1:$1/health"
}

# ---- the matrix ----------------------------------------------------------------
setting_args() { case $1 in c1) echo "-c 1 -r 200 -n 64" ;; c256) echo "-c 256 -r 2000 -n 64" ;;
                 *) echo "unknown setting $1" >&2; return 1 ;; esac; }
mode_args() { case $1 in keepalive) echo "" ;; fresh) echo "--fresh-conn" ;;
              *) echo "unknown mode $1" >&2; return 1 ;; esac; }

# Every target's processes run side by side (each on its own ports, idle while
# another is measured), and the cells go round the targets, one run each, rep
# after rep: a slow spell of this shared VM then hits every target alike
# instead of one target's whole block.
declare -A CELL_ARGS  # target -> "--cpu NAME=PID ... --url URL ..."

need_sglang_workers() {
  [ -n "${S1:-}" ] && return 0
  start_sglang_worker "$S1_PORT"; S1=$LAST_PID
  start_sglang_worker "$S2_PORT"; S2=$LAST_PID
}

need_tandem_workers() {
  [ -n "${T1:-}" ] && return 0
  start_tandem_worker "$T1_PORT"; T1=$LAST_PID
  start_tandem_worker "$T2_PORT"; T2=$LAST_PID
}

ACTIVE=()
for t in $TARGETS; do
  echo "== start $t $(date -u +%H:%M:%S)" >&2
  case $t in
    direct)
      need_sglang_workers
      CELL_ARGS[direct]="--cpu w1=$S1 --url http://127.0.0.1:$S1_PORT" ;;
    direct2)
      need_sglang_workers
      CELL_ARGS[direct2]="--cpu w1=$S1 --cpu w2=$S2 --url http://127.0.0.1:$S1_PORT --url http://127.0.0.1:$S2_PORT" ;;
    direct-grpc)
      need_tandem_workers
      CELL_ARGS[direct-grpc]="--cpu w1=$T1 --worker 127.0.0.1:$T1_PORT" ;;
    relay)
      need_tandem_workers
      "$PY" "$HERE/relay_floor.py" --worker "127.0.0.1:$T1_PORT" --port "$RL_PORT" > "$LOGDIR/relay.log" 2>&1 &
      RL=$!; PIDS+=("$RL")
      wait_http "http://127.0.0.1:$RL_PORT/health" 200 || { tail -20 "$LOGDIR/relay.log" >&2; exit 1; }
      CELL_ARGS[relay]="--cpu gateway=$RL --cpu w1=$T1 --url http://127.0.0.1:$RL_PORT" ;;
    tandem)
      if ! "$VENV/bin/tandem" gateway --help > /dev/null 2>&1; then
        echo "skipping tandem: '$VENV/bin/tandem gateway' is not available" >&2; continue
      fi
      need_tandem_workers
      # shellcheck disable=SC2086
      "$VENV/bin/tandem" gateway --host 127.0.0.1 --port "$G_PORT" --grpc-port "$GG_PORT" \
        --worker "127.0.0.1:$T1_PORT" --worker "127.0.0.1:$T2_PORT" --policy "$POLICY" \
        $GATEWAY_ARGS > "$LOGDIR/gateway.log" 2>&1 &
      GW=$!; PIDS+=("$GW")
      wait_http "http://127.0.0.1:$G_PORT/health" 600 || { tail -20 "$LOGDIR/gateway.log" >&2; exit 1; }
      a="--cpu gateway=$GW"
      for c in $(descendants "$GW"); do a="$a --cpu gateway_$c=$c"; done
      CELL_ARGS[tandem]="$a --cpu w1=$T1 --cpu w2=$T2 --url http://127.0.0.1:$G_PORT" ;;
    sglang)
      if [ ! -x "$VENV_SGLANG/bin/python" ]; then
        echo "skipping sglang: no $VENV_SGLANG (see the peers' run.sh)" >&2; continue
      fi
      need_sglang_workers
      HF_HUB_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:9 \
        "$VENV_SGLANG/bin/python" -m sglang_router.launch_router \
          --host 127.0.0.1 --port "$R_PORT" \
          --worker-urls "http://127.0.0.1:$S1_PORT" "http://127.0.0.1:$S2_PORT" \
          --policy round_robin \
          --prometheus-host 127.0.0.1 --prometheus-port "$M_PORT" > "$LOGDIR/sglang_router.log" 2>&1 &
      RT=$!; PIDS+=("$RT")
      ok=0
      for i in $(seq 200); do  # until both workers are registered and healthy
        if [ "$(curl -sf "http://127.0.0.1:$R_PORT/workers" 2>/dev/null | grep -o '"is_healthy":true' | wc -l)" = 2 ]; then
          ok=1; break
        fi
        sleep 0.1
      done
      [ $ok = 1 ] || { echo "sglang-router did not register 2 healthy workers" >&2; exit 1; }
      CELL_ARGS[sglang]="--cpu gateway=$RT --cpu w1=$S1 --cpu w2=$S2 --url http://127.0.0.1:$R_PORT" ;;
    *) echo "unknown target $t" >&2; continue ;;
  esac
  ACTIVE+=("$t")
done

for rep in $(seq "$REPS"); do
  for s in $SETTINGS; do
    for m in $MODES; do
      echo "== rep $rep $s $m $(date -u +%H:%M:%S)" >&2
      for t in "${ACTIVE[@]}"; do
        gen=("$PEERS/loadgen.py")
        if [ "$t" = direct-grpc ]; then
          [ "$m" = keepalive ] || continue       # a gRPC channel is never per request
          gen=("$HERE/grpc_loadgen.py"); m_args="${GRPC_LOADGEN_ARGS:-}"
        else
          m_args="$(mode_args "$m")"
        fi
        # shellcheck disable=SC2046,SC2086
        "$PY" "${gen[@]}" ${CELL_ARGS[$t]} $(setting_args "$s") $m_args \
          --tag target="$t" --tag setting="$s" --tag mode="$m" --tag rep="$rep" \
          --tag commit="$COMMIT" >> "$RAW" \
          || echo "loadgen exit $? ($t $s $m $rep)" >&2
      done
    done
  done
done
[ -n "${GW:-}" ] && record_status tandem "$GW"
[ -n "${RT:-}" ] && record_status sglang "$RT"

cat "$LOGDIR/status.txt" >&2
"$PY" "$HERE/summarize_gateway.py" "$RAW" -o "$OUT/gateway_overhead.md"
