#!/bin/bash
# Installs the Debian packages Ember needs to build and test: the guest
# kernel sources and toolchain, containerd and runc, busybox for the test
# image, protoc for the CRI client, CNI plugins. Idempotent.
set -euo pipefail

packages=(
    linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev
    cpio kmod pkg-config protobuf-compiler libseccomp-dev
    containerd runc busybox-static containernetworking-plugins iproute2
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    echo "install-deps: all packages present"
fi
if ! command -v cargo >/dev/null; then
    echo "install-deps: cargo (Rust toolchain) is required and not on PATH" >&2
    exit 1
fi
