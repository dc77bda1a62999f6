#!/bin/bash
# Build Ember's guest kernel (an uncompressed ELF vmlinux) from Debian's
# linux-source-6.1, with deploy/kernel/ember.config applied on top of
# allnoconfig and deploy/kernel/patches/*.patch applied in order.
#
# The result is cached by content hash (source version, config fragment,
# patches, this script) under $EMBER_CACHE_DIR (default /var/cache/ember),
# so a second run is instant. The vmlinux is then installed as
# $EMBER_OUT_DIR/vmlinux (default /var/lib/ember).
#
# Needs: linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="${EMBER_CACHE_DIR:-/var/cache/ember}"
out="${EMBER_OUT_DIR:-/var/lib/ember}"
jobs="${EMBER_KERNEL_JOBS:-$(nproc)}"
tarball="$(ls /usr/src/linux-source-6.1.tar.* 2>/dev/null | head -n1 || true)"

if [ -z "$tarball" ]; then
    echo "build-kernel: /usr/src/linux-source-6.1.tar.* not found; apt-get install linux-source-6.1" >&2
    exit 1
fi

src_version="$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || stat -c %s "$tarball")"
key="$( { echo "$src_version"; cat "$here/kernel/ember.config" "$here"/kernel/patches/*.patch "$0"; } | sha256sum | cut -c1-16)"
dest="$cache/kernel/$key"

if [ -f "$dest/vmlinux" ]; then
    echo "build-kernel: cached $dest/vmlinux"
else
    work="$cache/kernel-build"
    rm -rf "$work" && mkdir -p "$work"
    echo "build-kernel: building $key from $tarball in $work (about 10 min on 2 cores)"
    tar -C "$work" -xf "$tarball"
    ksrc="$work/linux-source-6.1"
    for p in "$here"/kernel/patches/*.patch; do
        echo "build-kernel: applying $(basename "$p")"
        patch -d "$ksrc" -p1 --forward --quiet < "$p"
    done
    make -C "$ksrc" -s ARCH=x86_64 allnoconfig
    "$ksrc/scripts/kconfig/merge_config.sh" -m -O "$ksrc" "$ksrc/.config" "$here/kernel/ember.config" >/dev/null
    make -C "$ksrc" -s ARCH=x86_64 olddefconfig
    # Every option of the fragment must have survived olddefconfig: a
    # silently dropped option gives a guest that boots but lacks a feature.
    missing=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*) grep -qxF "$line" "$ksrc/.config" || { echo "build-kernel: not applied: $line" >&2; missing=1; } ;;
            "# CONFIG_"*" is not set") opt="${line#\# }"; opt="${opt%% *}"; ! grep -q "^$opt=" "$ksrc/.config" || { echo "build-kernel: still set: $opt" >&2; missing=1; } ;;
        esac
    done < "$here/kernel/ember.config"
    [ "$missing" = 0 ] || { echo "build-kernel: config fragment not fully applied" >&2; exit 1; }
    make -C "$ksrc" -s ARCH=x86_64 -j"$jobs" vmlinux
    mkdir -p "$dest"
    cp "$ksrc/.config" "$dest/config"
    cp "$ksrc/vmlinux" "$dest/vmlinux.tmp"
    strip --strip-debug "$dest/vmlinux.tmp" || true
    mv "$dest/vmlinux.tmp" "$dest/vmlinux"
    rm -rf "$work"
fi

mkdir -p "$out"
cp "$dest/vmlinux" "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"
cp "$dest/config" "$out/vmlinux.config"
echo "build-kernel: installed $out/vmlinux"
