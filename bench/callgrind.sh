#!/usr/bin/env bash
# Instructions per request of `trellis proxy` (single hop, HTTP/1.1), counted by callgrind:
# repeatable where the wrk rows of bench/run.sh are not (a proxy start lands anywhere in a ±15%
# band on this shared machine), so it resolves effects of ~1%. Per row: the release binary
# under `valgrind --tool=callgrind`, `oha -n 500 -c 16` to warm up, counters zeroed, `oha -n
# 4000 -c 16`, counters dumped; the dump's total Ir divided by 4,000 is printed.
#
# Usage: bash bench/callgrind.sh   (ROWS="trellis trellis-authz10" by default, SKIP_BUILD=1,
# BENCH_KEEP=1 keeps the temp dir with the dumps for callgrind_annotate). Needs valgrind, oha,
# nginx (bash bench/setup.sh). Everything listens on 127.0.0.1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

read -r -a ROWS <<<"${ROWS:-trellis trellis-authz10}"
REQUESTS=4000
BIN=${TRELLIS_BIN:-$ROOT/target/release/trellis}
for t in valgrind callgrind_control oha curl "$(nginx_bin)"; do
  command -v "$t" >/dev/null 2>&1 || die "$t not found: run bash bench/setup.sh"
done
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  (cd "$ROOT" && cargo build --release -p trellis-cli)
fi
bench_init

alloc_port ORIGIN_PORT
write_origin_nginx "$BENCH_TMP/origin" "$ORIGIN_PORT"
start_nginx origin "$LOAD_CPU" "$BENCH_TMP/origin"
wait_ready "$BENCH_LAST_PID" "http://127.0.0.1:$ORIGIN_PORT/" || die "origin did not start"

for row in "${ROWS[@]}"; do
  alloc_port port; alloc_port admin
  dir="$BENCH_TMP/$row"
  case "$row" in
    trellis) write_trellis "$dir" "$port" "$admin" "$ORIGIN_PORT" ;;
    trellis-authz10) write_trellis_authz "$dir" "$port" "$admin" "$ORIGIN_PORT" ;;
    *) die "unknown row $row (trellis, trellis-authz10)" ;;
  esac
  TRELLIS_LOG=warn valgrind --tool=callgrind --dump-instr=no \
    --callgrind-out-file="$dir/callgrind.out" "$BIN" proxy --config "$dir/trellis.yaml" \
    --workers 1 2>"$dir/valgrind.log" &
  pid=$!
  BENCH_PIDS+=("$pid")
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$admin/ready" >/dev/null && break; sleep 0.1; done
  oha -n 500 -c 16 --no-tui "http://127.0.0.1:$port/" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  oha -n "$REQUESTS" -c 16 --no-tui "http://127.0.0.1:$port/" >/dev/null
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"; wait "$pid" 2>/dev/null || true
  total=$(callgrind_annotate "$dir"/callgrind.out.1 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
  [ -n "$total" ] || die "no callgrind dump for $row (see $dir/valgrind.log)"
  echo "$row: $((total / REQUESTS)) instructions per request (total $total over $REQUESTS)"
done
