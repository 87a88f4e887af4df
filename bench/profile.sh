#!/usr/bin/env bash
# Profiles `trellis proxy` as a single-hop HTTP/1.1 proxy under wrk load: perf samples (the
# software cpu-clock event works where hardware counters are not exposed) and a text report of
# the hottest symbols. Usage: bash bench/profile.sh [seconds]   (needs linux-perf, wrk, nginx)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
tmp=$(mktemp -d /tmp/trellis-profile.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

cargo build --release -p trellis-cli >/dev/null
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
origin=$(port); proxy=$(port); admin=$(port)
mkdir -p "$tmp/origin"
cat > "$tmp/origin/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $tmp/origin/nginx.pid; error_log $tmp/origin/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000;
  server { listen 127.0.0.1:$origin; location / { return 200 "ok\n"; } } }
CONF
taskset -c 1 nginx -p "$tmp/origin" -c "$tmp/origin/nginx.conf" & pids+=($!)
cat > "$tmp/trellis.yaml" <<YAML
service: bench
admin: 127.0.0.1:$admin
outbound: { listen: null }
inbound:
  - listen: 127.0.0.1:$proxy
    app: 127.0.0.1:$origin
    protocol: http1
YAML
TRELLIS_LOG=warn taskset -c 0 target/release/trellis proxy --config "$tmp/trellis.yaml" --workers 1 & tp=$!; pids+=($tp)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/ready" >/dev/null && break; sleep 0.05; done
taskset -c 1 wrk -t1 -c64 -d2s "http://127.0.0.1:$proxy/" >/dev/null
taskset -c 1 wrk -t1 -c64 -d"$((secs + 2))s" "http://127.0.0.1:$proxy/" > "$tmp/wrk.txt" &
wp=$!
perf record -e cpu-clock -F 2000 -g --call-graph dwarf,16384 -p "$tp" -o "$tmp/perf.data" -- sleep "$secs" 2>/dev/null
wait "$wp"
grep -E "Requests/sec" "$tmp/wrk.txt"
perf report -i "$tmp/perf.data" --no-children --percent-limit 1.5 --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -40
echo "perf data: $tmp/perf.data"
