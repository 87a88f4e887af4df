#!/usr/bin/env bash
# Single-hop HTTP/1.1 proxy benchmark: direct origin vs trellis vs haproxy vs nginx vs Envoy,
# all in one run on this machine. See docs/benchmarks.md for what the numbers mean.
#
#   bash bench/setup.sh && bash bench/run.sh
#
# Environment: DURATION (s, default 10), RATE (open-loop req/s, 2000), CONNS (64), WARMUP (s, 2),
# REPEAT (wrk runs per proxy start, default 2), ROUNDS (interleaved rounds over all rows, 3; the
# wrk median is over all REPEAT x ROUNDS runs),
# ROWS ("direct trellis trellis-authz10 trellis-out1 trellis-p2c4 haproxy nginx envoy": trellis
# is the inbound path; -authz10 the same with ten AuthorizationPolicies; -out1 the outbound path
# through a per-upstream port to one endpoint; -p2c4 the same to four endpoints, so its gap to
# -out1 is the default balancer's overhead), SKIP_BUILD=1, TRELLIS_BIN=path, NO_DOC=1 (print only),
# BENCH_KEEP=1 (keep the temp dir with configs and logs), QUIET_PCT (10) / QUIET_WAIT (600 s):
# before each row wait up to QUIET_WAIT for the machine to be at most QUIET_PCT busy; OTHER_MAX
# (5) / ROW_TRIES (3): measure a row again when other processes took more than OTHER_MAX % of the
# CPUs during its wrk runs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

DOC="$ROOT/docs/benchmarks.md"
read -r -a ROWS <<<"${ROWS:-direct trellis trellis-authz10 trellis-out1 trellis-p2c4 haproxy nginx envoy}"
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
# start_row NAME: sets ROW_URL and ROW_PID (empty for direct).
start_row() {
  local name=$1 dir="$BENCH_TMP/$1" port admin
  ROW_PID=""
  case "$name" in
    direct)
      ROW_URL="http://127.0.0.1:$ORIGIN_PORT/"
      return 0 ;;
    trellis|trellis-authz10|trellis-out1|trellis-p2c4)
      alloc_port port; alloc_port admin
      case "$name" in
        trellis) write_trellis "$dir" "$port" "$admin" "$ORIGIN_PORT" ;;
        trellis-authz10) write_trellis_authz "$dir" "$port" "$admin" "$ORIGIN_PORT" ;;
        trellis-out1) write_trellis_upstream "$dir" "$port" "$admin" "$ORIGIN_PORT" 1 ;;
        trellis-p2c4) write_trellis_upstream "$dir" "$port" "$admin" "$ORIGIN_PORT" 4 ;;
      esac
      start_trellis "$name" "$PROXY_CPU" "$dir" "$TRELLIS_BIN"
      ROW_PID=$BENCH_LAST_PID
      wait_ready "$ROW_PID" "http://127.0.0.1:$admin/ready" || return 1 ;;
    haproxy)
      alloc_port port
      write_haproxy "$dir" "$port" "$ORIGIN_PORT"
      start_haproxy haproxy "$PROXY_CPU" "$dir"
      ROW_PID=$BENCH_LAST_PID
      wait_ready "$ROW_PID" "http://127.0.0.1:$port/" || return 1 ;;
    nginx)
      alloc_port port
      write_proxy_nginx "$dir" "$port" "$ORIGIN_PORT"
      start_nginx nginx "$PROXY_CPU" "$dir"
      ROW_PID=$BENCH_LAST_PID
      wait_ready "$ROW_PID" "http://127.0.0.1:$port/" || return 1 ;;
    envoy)
      alloc_port port; alloc_port admin
      write_envoy "$dir" "$port" "$admin" "$ORIGIN_PORT"
      start_envoy envoy "$PROXY_CPU" "$dir"
      ROW_PID=$BENCH_LAST_PID
      wait_ready "$ROW_PID" "http://127.0.0.1:$admin/ready" || return 1 ;;
    *) die "unknown row $name" ;;
  esac
  ROW_URL="http://127.0.0.1:$port/"
  wait_ready "$ROW_PID" "$ROW_URL" 10 || return 1
}

R_ARRAYS=(R_CONNS R_OTHER R_RPS R_RPS_ALL R_WRK_ERR R_NON2XX R_P50 R_P90 R_P99 R_P999 R_OHA_RPS R_OHA_ERR
          R_CPU R_IDLE R_PEAK R_NOTE)
for arr in "${R_ARRAYS[@]}"; do declare -A "$arr"; done

# measure_row NAME ROUND: one proxy start, WARMUP, REPEAT wrk runs (RSS sampled), one oha run.
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
    log "$name failed to start; log tail:"; tail -20 "$BENCH_TMP/$name.log" >&2 || true
    R_NOTE[$k]="failed to start"
    [ -n "$ROW_PID" ] && bench_stop "$ROW_PID"
    return 0
  fi
  check_ok "$ROW_URL" || R_NOTE[$k]="wrong answer to a single request"

  local tree="" idle="" peak="" sampler
  if [ -n "$ROW_PID" ]; then
    sleep 1
    tree=$(pid_tree "$ROW_PID" | tr '\n' ' ')
    # shellcheck disable=SC2086
    idle=$(rss_kb $tree)
    R_IDLE[$k]=$(kb_to_mb "$idle")
    log "$name pids [$tree] idle RSS ${R_IDLE[$k]} MB"
  fi

  run_wrk "$out/warmup.txt" "$ROW_URL" "$WARMUP" || true

  if [ -n "$ROW_PID" ]; then
    echo "$idle" >"$out/peak_kb"
    # shellcheck disable=SC2086
    rss_sampler_start "$out/peak_kb" $tree
    sampler=$BENCH_LAST_PID
  fi
  local i all=() non2xx=0 sockerr=0
  # shellcheck disable=SC2086
  foreign_begin $tree $ORIGIN_TREE
  for i in $(seq 1 "$REPEAT"); do
    if [ "$i" = 1 ]; then   # halfway through the first run: connections open to the origin
      (sleep "$(awk -v d="$DURATION" 'BEGIN { print d / 2 }')"; origin_conns "$ORIGIN_PORT" >"$out/upstream_conns") &
      BENCH_PIDS+=("$!")
    fi
    run_wrk "$out/wrk.$i.txt" "$ROW_URL" || R_NOTE[$k]="wrk failed"
    all+=("$(wrk_rps "$out/wrk.$i.txt")")
    non2xx=$((non2xx + $(wrk_non2xx "$out/wrk.$i.txt")))
    sockerr=$((sockerr + $(wrk_sockerr "$out/wrk.$i.txt")))
  done
  if [ -n "$ROW_PID" ]; then
    bench_stop "$sampler"
    peak=$(<"$out/peak_kb")
    R_PEAK[$k]=$(kb_to_mb "$peak")
  fi
  R_CONNS[$k]=$(cat "$out/upstream_conns" 2>/dev/null || true)
  R_RPS[$k]=$(median 0 "${all[@]}")
  R_RPS_ALL[$k]="${all[*]}"
  R_NON2XX[$k]=$non2xx
  R_WRK_ERR[$k]=$sockerr
  log "$name wrk: ${R_RPS[$k]} rps (median of ${all[*]}), non-2xx $non2xx, socket errors $sockerr"

  local t0=0 t1=0
  # shellcheck disable=SC2086
  [ -n "$ROW_PID" ] && t0=$(cpu_ticks $tree)
  run_oha "$out/oha.json" "$ROW_URL" || R_NOTE[$k]="oha failed"
  # shellcheck disable=SC2086
  [ -n "$ROW_PID" ] && t1=$(cpu_ticks $tree)
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
    if [ -n "$ROW_PID" ] && [ "$n" -gt 0 ]; then
      R_CPU[$k]=$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v n="$n" \
        'BEGIN { printf "%.0f", d / hz * 1000 * 10000 / n }')
    fi
    log "$name oha @${RATE}/s: p50 ${R_P50[$k]} p99 ${R_P99[$k]} p99.9 ${R_P999[$k]} ms, errors ${R_OHA_ERR[$k]}"
  fi

  if [ -n "$ROW_PID" ]; then
    local errs
    local pat='error|panic|critical'
    [[ "$name" == trellis* ]] && pat='error|panic|warn'   # trellis: warnings count too
    errs=$(grep -ciE "$pat" "$BENCH_TMP/$name.log" || true)
    if [ "$errs" -gt 0 ]; then
      log "$name log has $errs error/warn lines:"; head -5 "$BENCH_TMP/$name.log" >&2
      local first
      first=$(grep -iE -m1 "$pat" "$BENCH_TMP/$name.log" | sed -E 's/^[0-9TZ:.-]+ +//; s/\|/\\|/g' | cut -c1-90)
      R_NOTE[$k]="${R_NOTE[$k]:+${R_NOTE[$k]}; }$errs error/warn log line(s), first: \`$first\`"
      cp "$BENCH_TMP/$name.log" "$out/proxy.log"
    fi
    bench_stop "$ROW_PID"
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
  # shellcheck disable=SC2046
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
  for x in R_IDLE R_PEAK R_OTHER R_CONNS; do
    local -n dst3=$x
    dst3[$n]=$(vals "$x" "$n" | sort -g | tail -1)
  done
  R_NOTE[$n]=$(vals R_NOTE "$n" | sort -u | paste -sd ';' | sed 's/;/; /g')
}

# Rounds are interleaved (every row once, then every row again) so slow drift of the machine and
# a proxy's start-to-start variance spread over all rows. A row-round whose wrk runs shared the
# machine with other work (other CPU % above OTHER_MAX during wrk + oha) is measured again, up to
# ROW_TRIES times.
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
lt() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "" && a != "–" && a + 0 < b + 0) }'; }
verdict() { # verdict ge|lt VALUE LIMIT
  if [ -z "$2" ] || [ "$2" = "–" ]; then echo "not measured"; elif "$@"; then echo "**met**"; else echo "**not met**"; fi
}

REPORT="$BENCH_TMP/report.md"
{
  echo "### Single hop, HTTP/1.1 keep-alive — run $STARTED"
  echo
  echo "Machine: \`nproc\` = $(nproc), $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), Linux $(uname -r)."
  sha=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
  dirty=$(git -C "$ROOT" status --porcelain -- crates Cargo.toml Cargo.lock 2>/dev/null | wc -l)
  echo "Trellis: commit \`$sha\`$( [ "$dirty" -gt 0 ] && echo " plus uncommitted changes in $dirty file(s) under crates/" ), release build."
  echo "Settings: proxy pinned to CPU $PROXY_CPU (one worker), origin (nginx, 1 worker) and load"
  echo "generators on CPU $LOAD_CPU. $ROUNDS interleaved rounds over the rows; in each, the proxy is started,"
  echo "idle RSS read, ${WARMUP}s of unrecorded warm-up, wrk \`-t1 -c$CONNS -d${DURATION}s\` $REPEAT times (RSS"
  echo "sampled), then oha open loop at $RATE req/s, $CONNS connections, ${DURATION}s, \`--latency-correction\`."
  echo "Aggregation: wrk req/s is the median of all $((REPEAT * ROUNDS)) wrk runs (listed under *wrk runs*),"
  echo "latencies and CPU the median over rounds, RSS / other CPU / origin conns the maximum, errors the sum."
  echo "Each row waits for the machine to be quiet (≤ ${QUIET_PCT:-10}% busy) first; *other CPU %* is what"
  echo "processes outside the benchmark used during the wrk and oha runs (a row-round above ${OTHER_MAX}% is"
  echo "measured again, up to $ROW_TRIES tries). *origin conns*: connections open to the origin halfway"
  echo "through the first wrk run."
  echo
  echo "| row | wrk req/s (median) | wrk runs | wrk non-2xx / socket errors | origin conns | p50 ms | p90 ms | p99 ms | p99.9 ms | oha req/s (errors) | CPU ms / 10k req | RSS idle MB | RSS peak MB | other CPU % | note |"
  echo "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
  for r in "${ROWS[@]}"; do
    echo "| $r | $(v "${R_RPS[$r]:-}") | $(v "${R_RPS_ALL[$r]:-}") | $(v "${R_NON2XX[$r]:-}") / $(v "${R_WRK_ERR[$r]:-}") | $(v "${R_CONNS[$r]:-}") | $(v "${R_P50[$r]:-}") | $(v "${R_P90[$r]:-}") | $(v "${R_P99[$r]:-}") | $(v "${R_P999[$r]:-}") | $(v "${R_OHA_RPS[$r]:-}") ($(v "${R_OHA_ERR[$r]:-}")) | $(v "${R_CPU[$r]:-}") | $(v "${R_IDLE[$r]:-}") | $(v "${R_PEAK[$r]:-}") | $(v "${R_OTHER[$r]:-}") | ${R_NOTE[$r]:-} |"
  done
  echo
  t=${R_RPS[trellis]:-}; h=${R_RPS[haproxy]:-}; e=${R_RPS[envoy]:-}
  vs_h=$(ratio "$t" "$h"); vs_e=$(ratio "$t" "$e")
  echo "Trellis against the targets (DESIGN.md):"
  echo
  echo "| target | measured | verdict |"
  echo "|---|---|---|"
  echo "| throughput ≥ 1.0× haproxy | $(v "$t") / $(v "$h") req/s = ${vs_h}× | $(verdict ge "$vs_h" 1.0) |"
  echo "| throughput ≥ 3.0× Envoy | $(v "$t") / $(v "$e") req/s = ${vs_e}× | $(verdict ge "$vs_e" 3.0) |"
  echo "| idle RSS < 10 MB | $(v "${R_IDLE[trellis]:-}") MB | $(verdict lt "${R_IDLE[trellis]:-}" 10) |"
  echo "| RSS under load < 15 MB | $(v "${R_PEAK[trellis]:-}") MB | $(verdict lt "${R_PEAK[trellis]:-}" 15) |"
  a=${R_RPS[trellis-authz10]:-}; o1=${R_RPS[trellis-out1]:-}; p4=${R_RPS[trellis-p2c4]:-}
  echo "| 10 AuthorizationPolicies: no measurable throughput loss | $(v "$a") / $(v "$t") req/s = $(ratio "$a" "$t")× | compare with the spread of *wrk runs* |"
  echo "| default balancer (P2C over 4 endpoints) against 1 endpoint, outbound | $(v "$p4") / $(v "$o1") req/s = $(ratio "$p4" "$o1")× | overhead shown, no target |"
  nx=0; for r in "${ROWS[@]}"; do nx=$((nx + ${R_NON2XX[$r]:-0} + ${R_WRK_ERR[$r]:-0} + ${R_OHA_ERR[$r]:-0})); done
  if [ "$nx" -gt 0 ]; then
    echo
    echo "Some rows had non-2xx responses or errors (see the table); their throughput is not comparable."
  fi
  echo
  echo "Versions:"
  echo
  tool_versions "$TRELLIS_BIN"
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
  for f in origin/nginx.conf trellis/trellis.yaml trellis-authz10/trellis.yaml trellis-authz10/policies.yaml \
           trellis-p2c4/trellis.yaml haproxy/haproxy.cfg nginx/nginx.conf envoy/envoy.yaml; do
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
  replace_section "$DOC" '<!-- single-hop:start -->' '<!-- single-hop:end -->' "$REPORT"
  log "wrote the single-hop section of $DOC"
fi
