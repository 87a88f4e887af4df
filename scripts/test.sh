#!/usr/bin/env bash
# The whole Trellis test suite: installs what the tests need, builds, runs every test.
# This is the README's test command and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# System tools the end-to-end tests drive as real clients, and what the build needs.
need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# A real etcd cluster for the control plane's etcd store tests (testkit::etcd).
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
# The etcd client crate compiles etcd's protos with protoc at build time.
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
command -v cargo-nextest >/dev/null 2>&1 || cargo install cargo-nextest --locked

cargo build --workspace --all-targets
cargo nextest run --workspace --no-fail-fast "$@"
