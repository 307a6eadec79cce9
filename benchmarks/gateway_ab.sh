#!/usr/bin/env bash
# A/B of two gateways: the working tree's `tandem gateway` against the one of
# git revision $1, both in front of the same two fake Tandem workers
# (benchmarks/fake_worker.py), measured with the sglang-router peers' loadgen.py
# in turns (old, new, old, new, ...) so that a slow spell of this shared VM hits
# both alike. Prints per cell the medians of total p50 latency and gateway CPU
# (per request and per streamed token) and the median of the new/old ratios of
# the pairs; the loadgen lines go to $OUT (JSON lines, tagged side=old|new).
#
#   bash benchmarks/gateway_ab.sh HEAD~1                 # ~3 min on 2 cores
#   REPS=4 CELLS="256:2000" bash benchmarks/gateway_ab.sh 1582569
#
# Variables: REPS (default 8), CELLS ("C:R ..." default "1:300 256:2000"), N
# tokens per request (64), MODE ("" keep-alive, "--fresh-conn"), BASE port (18600),
# OUT (default ${TMPDIR:-/tmp}/gateway_ab.jsonl), VENV, PEERS.
set -euo pipefail
OLD_REV="${1:?usage: gateway_ab.sh OLD_REVISION}"
HERE="$(cd "$(dirname "$0")" && pwd)"; ROOT="$(dirname "$HERE")"
VENV="${VENV:-$ROOT/.venv}"; PY="$VENV/bin/python"
PEERS="${PEERS:-/work/shared/peers/sglang-router}"
REPS="${REPS:-8}"; CELLS="${CELLS:-1:300 256:2000}"; N="${N:-64}"; MODE="${MODE:-}"
BASE="${BASE:-18600}"; OUT="${OUT:-${TMPDIR:-/tmp}/gateway_ab.jsonl}"
TREE="$(mktemp -d "${TMPDIR:-/tmp}/gateway_ab_old.XXXXXX")"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  git -C "$ROOT" worktree remove --force "$TREE" 2>/dev/null || rm -rf "$TREE"
}
trap cleanup EXIT

git -C "$ROOT" worktree add -f --detach "$TREE" "$OLD_REV" -q
# The generated stubs (git-ignored) of the working tree: protos that changed between the
# two revisions would need the old tree's own (make stubs there) instead.
cp -r "$ROOT/tandem/." "$TREE/tandem/"
: > "$OUT"

W1=$((BASE + 61)); W2=$((BASE + 62))
for p in $W1 $W2; do
  "$PY" "$HERE/fake_worker.py" --host 127.0.0.1 --port "$p" > "${TMPDIR:-/tmp}/gateway_ab_w$p.log" 2>&1 &
  PIDS+=($!)
done
start_gateway() {  # tree, http port -> pid in $GPID
  (cd "$1" && PYTHONPATH="$1" exec "$PY" -m services.cli --log-level WARNING gateway --host 127.0.0.1 \
     --port "$2" --grpc-port $(($2 + 51)) --policy round_robin \
     --worker "127.0.0.1:$W1" --worker "127.0.0.1:$W2") > "${TMPDIR:-/tmp}/gateway_ab_$2.log" 2>&1 &
  GPID=$!; PIDS+=("$GPID")
  for _ in $(seq 300); do curl -sf -o /dev/null "http://127.0.0.1:$2/health" && return 0; sleep 0.1; done
  echo "gateway of $1 did not get healthy" >&2; exit 1
}
start_gateway "$TREE" $((BASE + 1)); OLD_PID=$GPID
start_gateway "$ROOT" $((BASE + 2)); NEW_PID=$GPID

for cell in $CELLS; do
  c=${cell%%:*}; r=${cell##*:}
  for rep in $(seq "$REPS"); do
    for side in old new; do
      if [ $side = old ]; then port=$((BASE + 1)); pid=$OLD_PID; else port=$((BASE + 2)); pid=$NEW_PID; fi
      # shellcheck disable=SC2086
      "$PY" "$PEERS/loadgen.py" --url "http://127.0.0.1:$port" -c "$c" -r "$r" -n "$N" $MODE \
        --cpu gateway="$pid" --tag side=$side --tag c="$c" --tag rep="$rep" --tag old="$OLD_REV" >> "$OUT" \
        || echo "loadgen exit $? ($side C=$c rep $rep)" >&2
    done
  done
done

"$PY" - "$OUT" <<'EOF'
import json, statistics as st, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if r["ok"] and r["chunks"]]
for c in dict.fromkeys(r["tags"]["c"] for r in rows):
    cell = {s: [r for r in rows if r["tags"]["c"] == c and r["tags"]["side"] == s] for s in ("old", "new")}
    def fig(r, k):
        g = r["cpu_s"]["gateway"]
        return {"total p50 ms": r["total_ms"]["p50"], "gateway CPU us/req": g / r["ok"] * 1e6,
                "gateway CPU us/token": g / r["chunks"] * 1e6}[k]
    print(f"C={c}, {len(cell['new'])} pairs:")
    for k in ("total p50 ms", "gateway CPU us/req", "gateway CPU us/token"):
        o, n = ([fig(r, k) for r in cell[s]] for s in ("old", "new"))
        print(f"  {k:22} old {st.median(o):9.2f}  new {st.median(n):9.2f}  "
              f"new/old (median of pairs) {st.median(b / a for a, b in zip(o, n)):.2f}")
EOF
