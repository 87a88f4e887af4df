#!/usr/bin/env bash
# Control plane scale benchmark: one `trellis control` (release, embedded store) with PROXIES
# simulated proxies connected (trellis-sim: one mTLS connection and config stream each, every
# snapshot ACKed), then ROUNDS times `trellis apply` of a mesh-wide PeerAuthentication (root
# namespace istio-system, so every proxy's snapshot changes), alternating STRICT / PERMISSIVE.
# Measures apply -> last ACK (target < 1 s) and the control plane's RSS with the proxies
# connected (target < 150 MB). See docs/benchmarks.md ("Control plane scale").
#
#   bash bench/control_scale.sh
#
# Environment: PROXIES (1000), ROUNDS (5), CONNECT_RATE (new streams/s while ramping, 200),
# SIM_TIMEOUT (s, overall limit of the simulator, default 60 + PROXIES / CONNECT_RATE + 20 per
# round), SIM_THREADS (simulator worker threads, 0 = one per CPU), SKIP_BUILD=1, NO_DOC=1 (print
# only), BENCH_KEEP=1 (keep the temp dir: logs, certificates, the simulator's JSON),
# QUIET_PCT (10) / QUIET_WAIT (120 s): wait up to QUIET_WAIT for the machine to be at most
# QUIET_PCT busy before starting; OTHER_MAX (5) / RUN_TRIES (3): measure again (fresh state,
# fresh control plane) when other processes took more than OTHER_MAX % of the CPUs while the
# simulator ran; the last try is reported.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

DOC="$ROOT/docs/benchmarks.md"
: "${PROXIES:=1000}" "${ROUNDS:=5}" "${CONNECT_RATE:=200}" "${SIM_THREADS:=0}"
: "${OTHER_MAX:=5}" "${RUN_TRIES:=3}"
: "${SIM_TIMEOUT:=$(awk -v n="$PROXIES" -v r="$CONNECT_RATE" -v k="$ROUNDS" 'BEGIN { printf "%d", 60 + n / r + 20 * k }')}"
TRELLIS_BIN=${TRELLIS_BIN:-$ROOT/target/release/trellis}
SIM_BIN=${SIM_BIN:-$ROOT/target/release/trellis-sim}
BUILD_CMD="cargo build --release -p trellis-cli -p trellis-testkit --bin trellis --bin trellis-sim"

for t in curl jq python3; do
  command -v "$t" >/dev/null 2>&1 || die "$t not found"
done
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "$BUILD_CMD"
  (cd "$ROOT" && $BUILD_CMD)
fi
[ -x "$TRELLIS_BIN" ] || die "$TRELLIS_BIN missing"
[ -x "$SIM_BIN" ] || die "$SIM_BIN missing"

# Every simulated proxy is one client socket here and one server socket in the control plane.
want_fds=$((2 * PROXIES + 1024))
[ "$want_fds" -lt 8192 ] && want_fds=8192
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want_fds" ]; then
  log "hard limit on open files is $hard (< $want_fds); raising the soft limit to it"
  want_fds=$hard
fi
ulimit -Sn "$want_fds"
log "ulimit -n $(ulimit -n)"

bench_init
STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')

# The resource every round changes: a mesh-wide PeerAuthentication (root namespace, no selector),
# which is part of every proxy's snapshot.
write_pa() {
  cat >"$BENCH_TMP/pa-$1.yaml" <<EOF
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: $2
EOF
}
write_pa strict STRICT
write_pa permissive PERMISSIVE

# measure TRY: a fresh state dir and certificate, a fresh control plane, the simulator. Files in
# $BENCH_TMP/tryTRY (sim.json, commands.log, logs). Sets RUN, CONTROL_PID, FOREIGN_PCT, SIM_RC,
# IDLE_KB, CONTROL_ERRORS, CONTROL_THREADS, BUSY_BEFORE.
measure() {
  RUN="$BENCH_TMP/try$1"
  mkdir -p "$RUN"
  local cl="$RUN/commands.log" cmd f grpc http
  wait_quiet "${QUIET_WAIT:-120}" || true
  BUSY_BEFORE=${QUIET_BUSY:-?}

  # The certificate every simulated proxy presents, issued offline (this also creates the CA);
  # before the control plane starts on the same state dir.
  local state="$RUN/state" certs="$RUN/certs"
  cmd=("$TRELLIS_BIN" ca issue --state-dir "$state" --service sim --namespace bench --out-dir "$certs")
  echo "+ ${cmd[*]}" >>"$cl"
  TRELLIS_LOG=warn "${cmd[@]}" >"$RUN/ca-issue.log" 2>&1 || { cat "$RUN/ca-issue.log" >&2; die "trellis ca issue failed"; }
  for f in sim.pem sim-key.pem ca.pem; do [ -s "$certs/$f" ] || die "trellis ca issue did not write $certs/$f"; done

  # The control plane: release build, embedded store in the state dir, loopback ports.
  alloc_port grpc
  alloc_port http
  echo "+ $TRELLIS_BIN control --state-dir $state --grpc 127.0.0.1:$grpc --http 127.0.0.1:$http >$RUN/control.log 2>&1 &" >>"$cl"
  echo "+ CONTROL_PID=\$!" >>"$cl"
  bench_spawn "try$1/control" "" "$TRELLIS_BIN" control --state-dir "$state" \
    --grpc "127.0.0.1:$grpc" --http "127.0.0.1:$http"
  CONTROL_PID=$BENCH_LAST_PID
  wait_ready "$CONTROL_PID" "http://127.0.0.1:$http/api/v1/health" 30 || {
    tail -20 "$RUN/control.log" >&2; die "the control plane did not start"; }
  export TRELLIS_API="127.0.0.1:$http"
  echo "+ export TRELLIS_API=127.0.0.1:$http" >>"$cl"
  log "try $1: control plane pid $CONTROL_PID, gRPC 127.0.0.1:$grpc, HTTP 127.0.0.1:$http"
  cmd=("$TRELLIS_BIN" apply -f "$BENCH_TMP/pa-permissive.yaml")
  echo "+ ${cmd[*]}" >>"$cl"
  "${cmd[@]}" >>"$RUN/apply.log" 2>&1 || { cat "$RUN/apply.log" >&2; die "the first apply failed"; }
  sleep 1
  IDLE_KB=$(rss_kb "$CONTROL_PID")
  log "control plane idle RSS $(kb_to_mb "$IDLE_KB") MB"

  # The simulator: connect PROXIES, settle, ROUNDS applies, then `trellis status` as a check.
  local sim=("$SIM_BIN" --control "127.0.0.1:$grpc"
    --cert "$certs/sim.pem" --key "$certs/sim-key.pem" --bundle "$certs/ca.pem"
    --proxies "$PROXIES" --service sim --connect-rate "$CONNECT_RATE" --threads "$SIM_THREADS"
    --control-pid "$CONTROL_PID" --rounds "$ROUNDS" --timeout "$SIM_TIMEOUT"
    --apply-cmd "$TRELLIS_BIN apply -f $BENCH_TMP/pa-strict.yaml"
    --apply-cmd "$TRELLIS_BIN apply -f $BENCH_TMP/pa-permissive.yaml"
    --status-cmd "$TRELLIS_BIN status -o json")
  # The command as one would type it (arguments with spaces in single quotes).
  { printf '+'; local a; for a in "${sim[@]}"; do case "$a" in *' '*) printf " '%s'" "$a" ;; *) printf ' %s' "$a" ;; esac; done
    echo " >$RUN/sim.json"; } >>"$cl"
  log "trellis-sim: $PROXIES proxies at $CONNECT_RATE/s, $ROUNDS rounds (limit ${SIM_TIMEOUT}s)"
  SIM_RC=0
  foreign_begin "$CONTROL_PID"
  timeout $((SIM_TIMEOUT + 60)) "${sim[@]}" >"$RUN/sim.json" 2> >(tee "$RUN/sim.log" >&2) || SIM_RC=$?
  foreign_end "$CONTROL_PID"
  jq -e . "$RUN/sim.json" >/dev/null 2>&1 || { tail -20 "$RUN/control.log" >&2; die "trellis-sim produced no summary (exit $SIM_RC)"; }
  log "try $1: other processes used ${FOREIGN_PCT}% of the CPUs while the simulator ran"
  [ "$SIM_RC" = 0 ] || log "trellis-sim exited $SIM_RC (see ok/error in its summary)"
  CONTROL_ERRORS=$(grep -ciE ' (error|warn) ' "$RUN/control.log" || true)
  CONTROL_THREADS=$(awk '/^Threads:/ { print $2 }' "/proc/$CONTROL_PID/status" 2>/dev/null || echo "?")
  bench_stop "$CONTROL_PID"
  echo "+ kill \$CONTROL_PID" >>"$cl"
}

TRY=0
while :; do
  TRY=$((TRY + 1))
  measure "$TRY"
  [ "$FOREIGN_PCT" -le "$OTHER_MAX" ] && break
  if [ "$TRY" -ge "$RUN_TRIES" ]; then
    log "still disturbed after $TRY tries; reporting the last"
    break
  fi
  log "try $TRY was disturbed (${FOREIGN_PCT}% > ${OTHER_MAX}%); measuring again"
done

# ---- report ------------------------------------------------------------------------------------
J="$RUN/sim.json"
q() { jq -r "$1 // \"–\"" "$J"; }
lt() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "–" && a != "" && a + 0 < b + 0) }'; }
verdict() { # verdict VALUE LIMIT
  if [ -z "$1" ] || [ "$1" = "–" ] || [ "$1" = null ]; then echo "not measured"; elif lt "$1" "$2"; then echo "**met**"; else echo "**not met**"; fi
}
LAST_MED=$(q .summary.apply_to_last_ack_ms_median)
LAST_MAX=$(q .summary.apply_to_last_ack_ms_max)
RSS_CONN=$(q .control_rss_mb.connected)
RSS_AFTER=$(q .control_rss_mb.after_rounds)
RSS_WITH=$(jq -r '[.control_rss_mb.connected, .control_rss_mb.after_rounds] | map(select(. != null)) | max // "–"' "$J")
# Paths in the report: $RUN for the try's directory, $TMP for the run's, relative to the repo.
scrub() { sed "s#$RUN#\$RUN#g; s#$BENCH_TMP#\$TMP#g; s#$ROOT/##g"; }

REPORT="$BENCH_TMP/report.md"
{
  echo "### Control plane scale, $(q .proxies) simulated proxies — run $STARTED"
  echo
  echo "Machine: \`nproc\` = $(nproc), $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), $(awk '/MemTotal/ { printf "%.0f GB", $2 / 1048576 }' /proc/meminfo) RAM, Linux $(uname -r)."
  echo "The control plane and the simulator share the machine (not pinned). ${BUSY_BEFORE}% of the CPUs were busy"
  echo "just before the measured try (try $TRY); other processes (not the control plane, the simulator or the"
  echo "commands it ran) used ${FOREIGN_PCT}% of them while it ran."
  sha=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
  dirty=$(git -C "$ROOT" status --porcelain -- crates Cargo.toml Cargo.lock 2>/dev/null | wc -l)
  echo "Trellis: commit \`$sha\`$( [ "$dirty" -gt 0 ] && echo " plus uncommitted changes in $dirty file(s) under crates/" ), release build; \`trellis control\` with the embedded"
  echo "store, $CONTROL_THREADS threads at the end of the run, $CONTROL_ERRORS warn/error lines in its log."
  echo
  echo "| target | measured | verdict |"
  echo "|---|---|---|"
  echo "| \`trellis apply\` → last ACK < 1 s (median over $(q .summary.rounds_complete) rounds) | median $LAST_MED ms, max $LAST_MAX ms | $(verdict "$LAST_MED" 1000) |"
  echo "| control plane RSS with $(q .proxies) proxies connected < 150 MB | $RSS_CONN MB settled after connecting, $RSS_AFTER MB after the rounds | $(verdict "$RSS_WITH" 150) |"
  echo
  echo "Control plane RSS: $(kb_to_mb "$IDLE_KB") MB idle (no proxy, one resource), $RSS_CONN MB with all $(q .proxies) connected, $RSS_AFTER MB"
  echo "after the rounds, peak (VmHWM, includes the ramp) $(q .control_rss_mb.peak_vmhwm) MB."
  echo
  echo "Ramp: $(q .proxies) streams at $(q .connect_rate_per_s)/s; all up after $(q .connect.seconds_to_all_streams_up) s, all with an ACKed snapshot after"
  echo "$(q .connect.seconds_to_all_acked_a_snapshot) s. Every registration changes the endpoints every proxy is sent: the proxies received"
  echo "$(q .connect.snapshots_received_during_ramp) snapshots during the ramp and $(q .connect.snapshots_received_while_settling) more while it settled; control plane CPU from the simulator's"
  echo "start to settled: $(q .connect.control_cpu_seconds) s. Each snapshot: $(q '.snapshot_of_proxy_1.services') service(s), $(q '.snapshot_of_proxy_1.endpoints') endpoints, $(q '.snapshot_of_proxy_1.resources') resource(s),"
  echo "$(jq -r '.rounds[-1].snapshot_bytes_median // "–"' "$J") bytes encoded."
  echo
  echo "| round | apply | CLI ms | version | apply → first snapshot ms | → snapshot p50 ms | p90 ms | p99 ms | **apply → last ACK ms** | missing | extra snapshots | control CPU ms | sim CPU ms |"
  echo "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
  jq -r '.rounds[] | "| \(.round) | \(.command | capture("pa-(?<m>[a-z]+)\\.yaml").m // .) | \(.command_ms // "–") | \(.version // "–") | \(.apply_to_first_snapshot_ms // "–") | \(.apply_to_snapshot_p50_ms // "–") | \(.apply_to_snapshot_p90_ms // "–") | \(.apply_to_snapshot_p99_ms // "–") | **\(.apply_to_last_ack_ms // "–")** | \(.proxies_missing // "–") | \(.extra_snapshots // "–") | \(.control_cpu_ms // "–") | \(.sim_cpu_ms // "–") |"' "$J"
  echo
  echo "The control plane's own view after the rounds (\`trellis status -o json\`): $(q .control_status.in_sync) of $(q .control_status.proxies_listed) proxies in"
  echo "sync, $(q .control_status.acked_latest_version) at version $(q .control_status.latest_acked_version). Simulator: $(q .sim.rss_mb) MB RSS, $(q .sim.cpu_seconds_total) s CPU in total; $(q .reconnects) reconnects,"
  echo "$(q .streams_down_at_end) streams down at the end; ok: $(q .ok)."
  if [ "$(q .error)" != "–" ]; then echo; echo "**Simulator error:** $(q .error)"; fi
  echo
  echo "<details><summary>Exact commands of this run (\$TMP = the run's temp dir, \$RUN = \$TMP/try$TRY)</summary>"
  echo
  echo '```'
  echo "ulimit -n $(ulimit -n)"
  echo "$BUILD_CMD"
  sed "s/^+ //; s/--control-pid [0-9]*/--control-pid \$CONTROL_PID/" "$RUN/commands.log" | scrub
  echo '```'
  echo
  echo "\`\$TMP/pa-strict.yaml\` (\`pa-permissive.yaml\` has \`mode: PERMISSIVE\`):"
  echo
  echo '```yaml'
  cat "$BENCH_TMP/pa-strict.yaml"
  echo '```'
  echo
  echo "The simulator's summary (\`sim.json\`):"
  echo
  echo '```json'
  scrub <"$J"
  echo '```'
  echo
  echo "</details>"
} >"$REPORT"

echo
cat "$REPORT"

if [ "${NO_DOC:-0}" != 1 ]; then
  if ! grep -qF '<!-- control-scale:start -->' "$DOC"; then
    printf '\n## Control plane scale\n\nMeasured with `bash bench/control_scale.sh` (see the top of the script for its settings).\n' >>"$DOC"
  fi
  replace_section "$DOC" '<!-- control-scale:start -->' '<!-- control-scale:end -->' "$REPORT"
  log "wrote the control plane scale section of $DOC"
fi
[ "$SIM_RC" = 0 ]
