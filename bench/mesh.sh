#!/usr/bin/env bash
# Mesh-path benchmark: client -> outbound proxy -> (mTLS) -> inbound proxy -> origin, for a pair of
# Trellis proxies and a pair of Envoys using the same certificates (issued by `trellis ca issue`),
# each with and without mTLS, against the origin direct. All in one run on this machine; see
# docs/benchmarks.md ("Mesh path") for what the numbers mean.
#
#   bash bench/setup.sh && bash bench/mesh.sh
#
# Environment: DURATION (s, default 10), RATE (open-loop req/s, 1000), CONNS (64), WARMUP (s, 2),
# REPEAT (wrk runs per pair start, default 2), ROUNDS (interleaved rounds over all rows, 3; the
# wrk median is over all REPEAT x ROUNDS runs),
# ROWS ("direct trellis-plain trellis-mtls envoy-plain envoy-mtls"), SKIP_BUILD=1, TRELLIS_BIN=path,
# NO_DOC=1 (print only), BENCH_KEEP=1 (keep the temp dir with configs, certificates and logs),
# QUIET_PCT (10) / QUIET_WAIT (600 s): before each row wait up to QUIET_WAIT for the machine to be
# at most QUIET_PCT busy; OTHER_MAX (5) / ROW_TRIES (3): measure a row again when other processes
# took more than OTHER_MAX % of the CPUs during its runs.
set -euo pipefail

: "${RATE:=1000}"   # before lib.sh, whose default (2000) is the single-hop one
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

DOC="$ROOT/docs/benchmarks.md"
read -r -a ROWS <<<"${ROWS:-direct trellis-plain trellis-mtls envoy-plain envoy-mtls}"
: "${ROUNDS:=3}" "${ROW_TRIES:=3}" "${OTHER_MAX:=5}"
TRELLIS_BIN=${TRELLIS_BIN:-$ROOT/target/release/trellis}

require_tools
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "cargo build --release -p trellis-cli"
  (cd "$ROOT" && cargo build --release -p trellis-cli)
fi
[ -x "$TRELLIS_BIN" ] || die "$TRELLIS_BIN missing"

bench_init
STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')

# ---- certificates: both workloads, from one CA, with Trellis's own CLI -----------------------------
CERTS="$BENCH_TMP/certs"
issue_mesh_certs "$TRELLIS_BIN" "$BENCH_TMP/ca" "$CERTS" || die "trellis ca issue failed"
log "certificates in $CERTS: $(cd "$CERTS" && echo *)"

# ---- origin: nginx on the load CPU ----------------------------------------------------------------
alloc_port ORIGIN_PORT
write_origin_nginx "$BENCH_TMP/origin" "$ORIGIN_PORT"
start_nginx origin "$LOAD_CPU" "$BENCH_TMP/origin"
ORIGIN_PID=$BENCH_LAST_PID
wait_ready "$ORIGIN_PID" "http://127.0.0.1:$ORIGIN_PORT/" || die "origin did not start"
check_ok "http://127.0.0.1:$ORIGIN_PORT/" || die "origin answers wrongly"
ORIGIN_TREE=$(pid_tree "$ORIGIN_PID" | tr '\n' ' ')
log "origin nginx on 127.0.0.1:$ORIGIN_PORT (cpu $LOAD_CPU, pids $ORIGIN_TREE)"

# ---- per-row start --------------------------------------------------------------------------------
# start_row NAME: starts the inbound proxy, then the outbound proxy, both on $PROXY_CPU. Sets
# ROW_URL (the outbound proxy's local port for origin-svc), ROW_PIDS (both proxies), ROW_HOP_PORT
# (the inbound proxy's listener), ROW_ADMIN_IN / ROW_ADMIN_OUT. ROW_PIDS is empty for direct.
start_row() {
  local name=$1 dir="$BENCH_TMP/$1" port hop admin_in admin_out certs=""
  ROW_PIDS=(); ROW_HOP_PORT=""; ROW_ADMIN_IN=""; ROW_ADMIN_OUT=""
  case "$name" in
    direct)
      ROW_URL="http://127.0.0.1:$ORIGIN_PORT/"
      return 0 ;;
    *-mtls) certs=$CERTS ;;
    *-plain) ;;
    *) die "unknown row $name" ;;
  esac
  alloc_port port; alloc_port hop; alloc_port admin_in; alloc_port admin_out
  ROW_HOP_PORT=$hop; ROW_ADMIN_IN=$admin_in; ROW_ADMIN_OUT=$admin_out
  case "$name" in
    trellis-*)
      write_trellis_mesh_in "$dir/in" "$hop" "$admin_in" "$ORIGIN_PORT" "$certs"
      write_trellis_mesh_out "$dir/out" "$port" "$admin_out" "$hop" "$certs"
      start_trellis "$name-in" "$PROXY_CPU" "$dir/in" "$TRELLIS_BIN"
      ROW_PIDS+=("$BENCH_LAST_PID")
      wait_ready "$BENCH_LAST_PID" "http://127.0.0.1:$admin_in/ready" || return 1
      start_trellis "$name-out" "$PROXY_CPU" "$dir/out" "$TRELLIS_BIN"
      ROW_PIDS+=("$BENCH_LAST_PID")
      wait_ready "$BENCH_LAST_PID" "http://127.0.0.1:$admin_out/ready" || return 1 ;;
    envoy-*)
      write_envoy_mesh_in "$dir/in" "$hop" "$admin_in" "$ORIGIN_PORT" "$certs"
      write_envoy_mesh_out "$dir/out" "$port" "$admin_out" "$hop" "$certs"
      start_envoy "$name-in" "$PROXY_CPU" "$dir/in"
      ROW_PIDS+=("$BENCH_LAST_PID")
      wait_ready "$BENCH_LAST_PID" "http://127.0.0.1:$admin_in/ready" || return 1
      start_envoy "$name-out" "$PROXY_CPU" "$dir/out"
      ROW_PIDS+=("$BENCH_LAST_PID")
      wait_ready "$BENCH_LAST_PID" "http://127.0.0.1:$admin_out/ready" || return 1 ;;
  esac
  ROW_URL="http://127.0.0.1:$port/"
  wait_ready "${ROW_PIDS[1]}" "$ROW_URL" 10 || return 1
}

# check_row NAME: is the hop between the two proxies what the row claims (mTLS, or plaintext; for
# Envoy also HTTP/2)? Reads the inbound proxy's metrics (Trellis: trellis_http_requests_total by
# its tls label; Envoy: ssl.handshake of the inbound listener and of the outbound cluster,
# upstream_cx_http2_total of the outbound cluster). Sets CHECK (a summary) and returns 1 if not.
check_row() {
  local name=$1 a b c d e
  CHECK="–"
  case "$name" in
    trellis-*)
      a=$(trellis_requests "$ROW_ADMIN_IN" inbound true)
      b=$(trellis_requests "$ROW_ADMIN_IN" inbound false)
      c=$(trellis_requests "$ROW_ADMIN_OUT" outbound true)
      d=$(trellis_metric_sum "$ROW_ADMIN_IN" trellis_tls_handshake_failures_total)
      if [ "$name" = trellis-mtls ]; then
        CHECK="mTLS: inbound requests tls=true $a, plaintext $b; handshake failures $d"
        [ "$a" -gt 0 ] && [ "$b" -eq 0 ] && [ "$c" -gt 0 ]
      else
        CHECK="plaintext: inbound requests tls=false $b, tls=true $a"
        [ "$b" -gt 0 ] && [ "$a" -eq 0 ]
      fi ;;
    envoy-*)
      a=$(envoy_stat_sum "$ROW_ADMIN_IN" '^listener[.].*[.]ssl[.]handshake$')
      b=$(envoy_stat_sum "$ROW_ADMIN_OUT" '^cluster[.].*[.]ssl[.]handshake$')
      c=$(envoy_stat_sum "$ROW_ADMIN_OUT" '^cluster[.].*[.]upstream_cx_http2_total$')
      d=$(envoy_stat_sum "$ROW_ADMIN_IN" '^listener[.].*[.]ssl[.]versions[.]TLSv1[.]3$')
      e=$(envoy_stat_sum "$ROW_ADMIN_IN" '^http[.]inbound[.]downstream_rq_2xx$')
      if [ "$name" = envoy-mtls ]; then
        CHECK="mTLS: ssl.handshake in $a / out $b (TLSv1.3 $d), h2 conns $c, inbound 2xx $e"
        [ "$a" -gt 0 ] && [ "$b" -gt 0 ] && [ "$c" -gt 0 ]
      else
        CHECK="plaintext: ssl.handshake in $a, h2c conns $c, inbound 2xx $e"
        [ "$a" -eq 0 ] && [ "$c" -gt 0 ]
      fi ;;
  esac
}

R_ARRAYS=(R_HOP R_CONNS R_OTHER R_RPS R_RPS_ALL R_WRK_ERR R_NON2XX R_P50 R_P90 R_P99 R_P999 R_OHA_RPS
          R_OHA_ERR R_CPU R_IDLE R_PEAK R_CHECK R_NOTE)
for arr in "${R_ARRAYS[@]}"; do declare -A "$arr"; done

# measure_row NAME ROUND: one pair start, WARMUP, REPEAT wrk runs (RSS sampled), one oha run.
# Results go to R_*["NAME#ROUND"]; aggregate_row folds the rounds into R_*[NAME].
measure_row() {
  local name=$1 round=$2
  local k="$name#$round" out="$BENCH_TMP/results/$name.$round"
  rm -rf "$out"; mkdir -p "$out"
  local arr
  for arr in "${R_ARRAYS[@]}"; do unset "$arr[$k]"; done
  log "== $name (round $round)"
  wait_quiet || true
  if ! start_row "$name"; then
    log "$name failed to start; log tails:"
    tail -20 "$BENCH_TMP/$name-in.log" "$BENCH_TMP/$name-out.log" >&2 2>/dev/null || true
    R_NOTE[$k]="failed to start"
    local p
    for p in "${ROW_PIDS[@]}"; do bench_stop "$p"; done
    return 0
  fi
  check_ok "$ROW_URL" || R_NOTE[$k]="wrong answer to a single request"
  # Before any load: the one request above must have crossed the hop the way the row claims.
  if [ "$name" != direct ] && ! check_row "$name"; then
    log "$name: hop check FAILED before measuring: $CHECK"
    R_NOTE[$k]="${R_NOTE[$k]:+${R_NOTE[$k]}; }hop check failed before measuring ($CHECK)"
  fi

  local tree="" idle="" peak="" sampler p
  if [ "${#ROW_PIDS[@]}" -gt 0 ]; then
    sleep 1
    for p in "${ROW_PIDS[@]}"; do tree+="$(pid_tree "$p" | tr '\n' ' ')"; done
    # shellcheck disable=SC2086
    idle=$(rss_kb $tree)
    R_IDLE[$k]=$(kb_to_mb "$idle")
    log "$name pids [$tree] idle RSS of the pair ${R_IDLE[$k]} MB"
  fi

  run_wrk "$out/warmup.txt" "$ROW_URL" "$WARMUP" || true

  if [ -n "$tree" ]; then
    echo "$idle" >"$out/peak_kb"
    # shellcheck disable=SC2086
    rss_sampler_start "$out/peak_kb" $tree
    sampler=$BENCH_LAST_PID
  fi
  local i all=() non2xx=0 sockerr=0
  # shellcheck disable=SC2086
  foreign_begin $tree $ORIGIN_TREE
  for i in $(seq 1 "$REPEAT"); do
    if [ "$i" = 1 ]; then   # halfway through the first run: connections open on each hop
      (sleep "$(awk -v d="$DURATION" 'BEGIN { print d / 2 }')"
       origin_conns "$ORIGIN_PORT" >"$out/upstream_conns"
       [ -n "$ROW_HOP_PORT" ] && origin_conns "$ROW_HOP_PORT" >"$out/hop_conns") &
      BENCH_PIDS+=("$!")
    fi
    run_wrk "$out/wrk.$i.txt" "$ROW_URL" || R_NOTE[$k]="wrk failed"
    all+=("$(wrk_rps "$out/wrk.$i.txt")")
    non2xx=$((non2xx + $(wrk_non2xx "$out/wrk.$i.txt")))
    sockerr=$((sockerr + $(wrk_sockerr "$out/wrk.$i.txt")))
  done
  if [ -n "$tree" ]; then
    bench_stop "$sampler"
    peak=$(<"$out/peak_kb")
    R_PEAK[$k]=$(kb_to_mb "$peak")
  fi
  R_CONNS[$k]=$(cat "$out/upstream_conns" 2>/dev/null || true)
  R_HOP[$k]=$(cat "$out/hop_conns" 2>/dev/null || true)
  R_RPS[$k]=$(median 0 "${all[@]}")
  R_RPS_ALL[$k]="${all[*]}"
  R_NON2XX[$k]=$non2xx
  R_WRK_ERR[$k]=$sockerr
  log "$name wrk: ${R_RPS[$k]} rps (median of ${all[*]}), non-2xx $non2xx, socket errors $sockerr, hop conns ${R_HOP[$k]:-–}"

  local t0=0 t1=0
  # shellcheck disable=SC2086
  [ -n "$tree" ] && t0=$(cpu_ticks $tree)
  run_oha "$out/oha.json" "$ROW_URL" || R_NOTE[$k]="oha failed"
  # shellcheck disable=SC2086
  [ -n "$tree" ] && t1=$(cpu_ticks $tree)
  # shellcheck disable=SC2086
  foreign_end $tree $ORIGIN_TREE
  R_OTHER[$k]=$FOREIGN_PCT
  log "$name: other processes used ${FOREIGN_PCT}% of the CPUs during wrk + oha"
  if [ -s "$out/oha.json" ]; then
    R_P50[$k]=$(oha_ms "$out/oha.json" p50)
    R_P90[$k]=$(oha_ms "$out/oha.json" p90)
    R_P99[$k]=$(oha_ms "$out/oha.json" p99)
    R_P999[$k]=$(oha_ms "$out/oha.json" p99.9)
    R_OHA_RPS[$k]=$(oha_rps "$out/oha.json")
    R_OHA_ERR[$k]=$(( $(oha_non2xx "$out/oha.json") + $(oha_errors "$out/oha.json") ))
    local n
    n=$(oha_total "$out/oha.json")
    if [ -n "$tree" ] && [ "$n" -gt 0 ]; then
      R_CPU[$k]=$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v n="$n" \
        'BEGIN { printf "%.0f", d / hz * 1000 * 10000 / n }')
    fi
    log "$name oha @${RATE}/s: p50 ${R_P50[$k]} p99 ${R_P99[$k]} p99.9 ${R_P999[$k]} ms, errors ${R_OHA_ERR[$k]}"
  fi

  if [ "${#ROW_PIDS[@]}" -gt 0 ]; then
    # After the load: the hop counters again, now covering every measured request.
    if check_row "$name"; then R_CHECK[$k]="yes: $CHECK"; else R_CHECK[$k]="**NO**: $CHECK"; fi
    log "$name hop check: ${R_CHECK[$k]}"
    local side errs first pat='error|panic|critical'
    case "$name" in trellis-*) pat='error|panic|warn' ;; esac   # trellis: warnings count too
    for side in in out; do
      local lf="$BENCH_TMP/$name-$side.log"
      # The plaintext inbound Trellis announces (expectedly) that it has no identity.
      errs=$(grep -iE "$pat" "$lf" | grep -cv 'no workload identity: inbound accepts plaintext only' || true)
      if [ "$errs" -gt 0 ]; then
        log "$name-$side log has $errs error/warn lines:"; head -5 "$lf" >&2
        first=$(grep -iE "$pat" "$lf" | grep -v 'no workload identity' | head -1 |
          sed -E 's/^[0-9TZ:.-]+ +//; s/\|/\\|/g' | cut -c1-90)
        R_NOTE[$k]="${R_NOTE[$k]:+${R_NOTE[$k]}; }$side: $errs error/warn log line(s), first: \`$first\`"
        cp "$lf" "$out/proxy-$side.log"
      fi
    done
    for p in "${ROW_PIDS[@]}"; do bench_stop "$p"; done
  fi
}

# vals ARRAY NAME: the values of ARRAY["NAME#1"], ARRAY["NAME#2"], ... (non-empty ones)
vals() {
  local -n _a=$1
  local r
  for r in $(seq 1 "$ROUNDS"); do [ -n "${_a[$2#$r]:-}" ] && echo "${_a[$2#$r]}"; done
  return 0
}
aggregate_row() {
  local n=$1 x
  R_RPS_ALL[$n]=$(vals R_RPS_ALL "$n" | tr '\n' ' ' | sed 's/ $//')
  # shellcheck disable=SC2086
  R_RPS[$n]=$(median 0 ${R_RPS_ALL[$n]})
  for x in R_P50 R_P90 R_P99 R_P999 R_OHA_RPS R_CPU; do
    local -n dst=$x
    local dec=2
    case $x in R_OHA_RPS|R_CPU) dec=0 ;; esac
    # shellcheck disable=SC2046
    dst[$n]=$(median "$dec" $(vals "$x" "$n"))
  done
  for x in R_NON2XX R_WRK_ERR R_OHA_ERR; do
    local -n dst2=$x
    dst2[$n]=$(vals "$x" "$n" | awk '{ s += $1 } END { if (NR) print s }')
  done
  for x in R_IDLE R_PEAK R_OTHER R_CONNS R_HOP; do
    local -n dst3=$x
    dst3[$n]=$(vals "$x" "$n" | sort -g | tail -1)
  done
  # The hop check: "yes" only if every round passed; show the last round's counters.
  if vals R_CHECK "$n" | grep -q '^\*\*NO'; then
    R_CHECK[$n]="**NO** in $(vals R_CHECK "$n" | grep -c '^\*\*NO') round(s): $(vals R_CHECK "$n" | grep -m1 '^\*\*NO' | sed 's/^\*\*NO\*\*: //')"
  else
    R_CHECK[$n]=$(vals R_CHECK "$n" | tail -1)
  fi
  R_NOTE[$n]=$(vals R_NOTE "$n" | sort -u | paste -sd ';' | sed 's/;/; /g')
}

# Rounds are interleaved (every row once, then every row again) so slow drift of the machine and
# a pair's start-to-start variance spread over all rows. A row-round that shared the machine with
# other work (other CPU % above OTHER_MAX during wrk + oha) is measured again, up to ROW_TRIES.
for round in $(seq 1 "$ROUNDS"); do
  for row in "${ROWS[@]}"; do
    for try in $(seq 1 "$ROW_TRIES"); do
      measure_row "$row" "$round"
      [ "${R_OTHER[$row#$round]:-0}" -le "$OTHER_MAX" ] && break
      log "$row: measuring again (try $try was disturbed)"
    done
  done
done
for row in "${ROWS[@]}"; do aggregate_row "$row"; done

# ---- report ---------------------------------------------------------------------------------------
v() { local x=${1:-}; echo "${x:-–}"; }
ratio() { awk -v a="${1:-0}" -v b="${2:-0}" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else print "–" }'; }
ge() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "–" && a + 0 >= b + 0) }'; }
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "–" && a + 0 <= b + 0) }'; }
verdict() { # verdict ge|le VALUE LIMIT
  if [ -z "$2" ] || [ "$2" = "–" ]; then echo "not measured"; elif "$@"; then echo "**met**"; else echo "**not met**"; fi
}
# added NAME: the row's open-loop p99 minus direct's (medians over rounds), ms
added() {
  local a=${R_P99[$1]:-} d=${R_P99[direct]:-}
  if [ -z "$a" ] || [ -z "$d" ]; then echo "–"; return; fi
  awk -v a="$a" -v d="$d" 'BEGIN { printf "%.2f", a - d }'
}
# cert_info FILE: "URI:spiffe://..., ECDSA P-256" from openssl, when available
cert_info() {
  command -v openssl >/dev/null 2>&1 || { echo "?"; return; }
  local san alg
  san=$(openssl x509 -in "$1" -noout -ext subjectAltName 2>/dev/null | sed -n '2p' | sed 's/^ *//')
  alg=$(openssl x509 -in "$1" -noout -text 2>/dev/null | awk '/NIST CURVE:/ { print "ECDSA " $3; exit }')
  echo "${san:-?}${alg:+, $alg}"
}

REPORT="$BENCH_TMP/report.md"
{
  echo "### Mesh path, client → outbound proxy → inbound proxy → origin — run $STARTED"
  echo
  echo "Machine: \`nproc\` = $(nproc), $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), Linux $(uname -r)."
  sha=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
  dirty=$(git -C "$ROOT" status --porcelain -- crates Cargo.toml Cargo.lock 2>/dev/null | wc -l)
  echo "Trellis: commit \`$sha\`$( [ "$dirty" -gt 0 ] && echo " plus uncommitted changes in $dirty file(s) under crates/" ), release build."
  echo "Certificates (one CA, \`trellis ca issue\`, used by both pairs): \`$MESH_CLIENT_SVC.pem\` $(cert_info "$CERTS/$MESH_CLIENT_SVC.pem");"
  echo "\`$MESH_SERVER_SVC.pem\` $(cert_info "$CERTS/$MESH_SERVER_SVC.pem")."
  echo "Settings: both proxies of a pair pinned to CPU $PROXY_CPU (one worker each), origin (nginx, 1 worker)"
  echo "and load generators on CPU $LOAD_CPU. Client → outbound proxy: HTTP/1.1 keep-alive; inbound proxy →"
  echo "origin: HTTP/1.1 keep-alive. $ROUNDS interleaved rounds over the rows; in each, the pair is started,"
  echo "one request checked (200 \`ok\`, and the hop check below), idle RSS read, ${WARMUP}s of unrecorded"
  echo "warm-up, wrk \`-t1 -c$CONNS -d${DURATION}s\` $REPEAT times (RSS sampled), then oha open loop at $RATE req/s,"
  echo "$CONNS connections, ${DURATION}s, \`--latency-correction\`."
  echo "Aggregation: wrk req/s is the median of all $((REPEAT * ROUNDS)) wrk runs (listed under *wrk runs*),"
  echo "latencies and CPU the median over rounds, RSS / other CPU / conns the maximum, errors the sum."
  echo "*added p99* is the row's p99 minus direct's p99 (both medians over rounds). Each row waits for the"
  echo "machine to be quiet (≤ ${QUIET_PCT:-10}% busy) first; a row-round where other processes used more than"
  echo "${OTHER_MAX}% of the CPUs is measured again, up to $ROW_TRIES tries. *hop conns* / *origin conns*:"
  echo "connections open between the two proxies / to the origin halfway through the first wrk run."
  echo
  echo "| row | wrk req/s (median) | wrk runs | wrk non-2xx / socket errors | hop conns | origin conns | p50 ms | p90 ms | p99 ms | p99.9 ms | added p99 ms | oha req/s (errors) | CPU ms / 10k req (pair) | RSS idle MB (pair) | RSS peak MB (pair) | other CPU % | hop really mTLS / plaintext? | note |"
  echo "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|"
  for r in "${ROWS[@]}"; do
    ad=$(added "$r"); [ "$r" = direct ] && ad="0"
    echo "| $r | $(v "${R_RPS[$r]:-}") | $(v "${R_RPS_ALL[$r]:-}") | $(v "${R_NON2XX[$r]:-}") / $(v "${R_WRK_ERR[$r]:-}") | $(v "${R_HOP[$r]:-}") | $(v "${R_CONNS[$r]:-}") | $(v "${R_P50[$r]:-}") | $(v "${R_P90[$r]:-}") | $(v "${R_P99[$r]:-}") | $(v "${R_P999[$r]:-}") | $ad | $(v "${R_OHA_RPS[$r]:-}") ($(v "${R_OHA_ERR[$r]:-}")) | $(v "${R_CPU[$r]:-}") | $(v "${R_IDLE[$r]:-}") | $(v "${R_PEAK[$r]:-}") | $(v "${R_OTHER[$r]:-}") | $(v "${R_CHECK[$r]:-}") | ${R_NOTE[$r]:-} |"
  done
  echo
  tm=${R_RPS[trellis-mtls]:-}; tp=${R_RPS[trellis-plain]:-}; em=${R_RPS[envoy-mtls]:-}; ep=${R_RPS[envoy-plain]:-}
  vs_e=$(ratio "$tm" "$em"); vs_p=$(ratio "$tm" "$tp")
  at=$(added trellis-mtls); ae=$(added envoy-mtls)
  if awk -v a="$at" -v e="$ae" 'BEGIN { exit !(a != "–" && e != "–" && e + 0 > 0) }'; then
    vs_lat=$(awk -v a="$at" -v e="$ae" 'BEGIN { printf "%.2f", a / e }')
  else
    vs_lat="–"
  fi
  echo "Trellis against the targets (DESIGN.md and the issue):"
  echo
  echo "| target | measured | verdict |"
  echo "|---|---|---|"
  echo "| mTLS mesh-path throughput ≥ 2.0× the Envoy pair's (trellis-mtls / envoy-mtls) | $(v "$tm") / $(v "$em") req/s = ${vs_e}× | $(verdict ge "$vs_e" 2.0) |"
  echo "| mTLS throughput ≥ 0.8× Trellis plaintext two-hop (trellis-mtls / trellis-plain) | $(v "$tm") / $(v "$tp") req/s = ${vs_p}× | $(verdict ge "$vs_p" 0.8) |"
  echo "| added open-loop p99 over direct ≤ 0.25× the Envoy pair's (trellis-mtls / envoy-mtls) | $at / $ae ms = ${vs_lat}× | $(verdict le "$vs_lat" 0.25) |"
  echo
  echo "Cost of mTLS on the hop (mTLS / plaintext throughput, same proxy): Trellis $(ratio "$tm" "$tp")×, Envoy $(ratio "$em" "$ep")×."
  bad=""
  for r in "${ROWS[@]}"; do
    case "${R_CHECK[$r]:-}" in \*\*NO*) bad+=" $r" ;; esac
  done
  if [ -n "$bad" ]; then
    echo
    echo "**The hop check failed for:$bad** (see the table): those rows did not measure what they claim."
  fi
  nx=0; for r in "${ROWS[@]}"; do nx=$((nx + ${R_NON2XX[$r]:-0} + ${R_WRK_ERR[$r]:-0} + ${R_OHA_ERR[$r]:-0})); done
  if [ "$nx" -gt 0 ]; then
    echo
    echo "Some rows had non-2xx responses or errors (see the table); their throughput is not comparable."
  fi
  echo
  echo "Versions:"
  echo
  echo "- wrk: $(wrk -v 2>&1 | head -1 | sed 's/ Copyright.*//')"
  echo "- oha: $(oha --version 2>&1 | head -1)"
  echo "- nginx (origin): $("$(nginx_bin)" -v 2>&1 | head -1)"
  echo "- envoy: $("$(envoy_bin)" --version 2>&1 | grep -o '[0-9a-f]*/[0-9.]*/[A-Za-z]*/[A-Z]*/[A-Za-z]*' | head -1)"
  echo "- trellis: $("$TRELLIS_BIN" --version 2>&1 | head -1), $(rustc -V 2>/dev/null)"
  echo
  echo "<details><summary>Exact commands of this run (\$TMP = the run's temp dir) and generated configs</summary>"
  echo
  echo '```'
  echo "cargo build --release -p trellis-cli"
  sed "s#$BENCH_TMP#\$TMP#g; s#$ROOT/##g; s/^+ //" "$BENCH_TMP/commands.log" |
    awk 'function out() { print prev (n > 1 ? "    # " n " times" : "") }
         NR > 1 && $0 == prev { n++; next }
         NR > 1 { out() } { prev = $0; n = 1 } END { if (NR) out() }'
  echo '```'
  for f in origin/nginx.conf \
           trellis-plain/in/trellis.yaml trellis-plain/out/trellis.yaml \
           trellis-mtls/in/trellis.yaml trellis-mtls/out/trellis.yaml \
           envoy-plain/in/envoy.yaml envoy-plain/out/envoy.yaml \
           envoy-mtls/in/envoy.yaml envoy-mtls/out/envoy.yaml; do
    [ -f "$BENCH_TMP/$f" ] || continue
    echo
    echo "\`\$TMP/$f\`:"
    echo
    echo '```'
    sed "s#$BENCH_TMP#\$TMP#g" "$BENCH_TMP/$f"
    echo '```'
  done
  echo
  echo "</details>"
} >"$REPORT"

echo
cat "$REPORT"

if [ "${NO_DOC:-0}" != 1 ]; then
  mkdir -p "$(dirname "$DOC")"
  replace_section "$DOC" '<!-- mesh:start -->' '<!-- mesh:end -->' "$REPORT"
  log "wrote the mesh section of $DOC"
fi
