#!/usr/bin/env bash
# Install the system packages vqscope's build, tests and demo need on Debian 12.
# Idempotent: skips apt when every package is already installed.
set -euo pipefail
PKGS=(
  python3 python3-venv python3-dev python3-pip gcc make libffi-dev pkg-config git
  python3-bpfcc bpfcc-tools
  qemu-system-x86 busybox-static linux-image-amd64 linux-headers-amd64 kmod
  dpdk dpdk-dev librte-net-virtio23 librte-net-vhost23 librte-mempool-ring23
  iproute2 iputils-ping procps
  e2fsprogs
  dwarves
  clang-14 libclang-rt-14-dev llvm
  liburing-dev
  prometheus
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# BCC needs kernel headers for the running kernel; a custom host kernel has
# none, so link the Debian headers (see shared/ENVIRONMENT.md).
kver=$(uname -r)
if [ ! -e "/lib/modules/$kver/build" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$hdr" ]; then
    common=${hdr%-amd64}-common
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$hdr" "/lib/modules/$kver/build"
    ln -sfn "$common" "/lib/modules/$kver/source"
  fi
fi
