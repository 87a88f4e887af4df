#!/usr/bin/env bash
# Builds and runs `trellis demo`, installing what the build needs first.
# Extra arguments go to `trellis demo`.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# The etcd client crate compiles etcd's protos with protoc at build time.
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

exec cargo run --release --bin trellis -- demo "$@"
