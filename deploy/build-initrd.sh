#!/bin/bash
# Build Ember's guest initrd: an UNCOMPRESSED newc cpio archive (gzip
# inflate is far too slow in a guest whose ring 0 is emulated) holding
#
#   /init           the static ember-agent (mode 0755), PID 1 of the VM
#   /dev/console    char 5,1: init's stdin/stdout/stderr before devtmpfs
#   /dev/null       char 1,3: Rust's runtime reopens closed fds 0-2 on
#                   /dev/null before main and ABORTS if it cannot (PID 1
#                   aborting = kernel panic), e.g. when there is no console
#   /proc /sys /dev /run /tmp /etc   empty mount points / directories
#
# The agent is built in release mode for the baseline x86-64 target (never
# target-cpu=native: the guest does not preserve AVX state) and linked
# statically with glibc (crt-static; no musl target is available):
#
#   RUSTFLAGS="-C target-feature=+crt-static" \
#     cargo build --release -p ember-agent --target x86_64-unknown-linux-gnu
#
# Output: $EMBER_OUT_DIR/initrd.img (default /var/lib/ember); its path is
# printed on stdout as the last line (everything else goes to stderr).
# Runs from any cwd, and is idempotent: the archive is reproducible (fixed
# owners and mtimes) and only replaced when its content changes.
#
# Environment:
#   EMBER_OUT_DIR     output directory (default /var/lib/ember)
#   EMBER_AGENT_BIN   use this prebuilt static agent instead of building
#   EMBER_NO_STRIP=1  keep the agent's symbols
#   CARGO_TARGET_DIR  honoured like cargo does
#
# Needs: cargo, cpio (GNU, newc), file; strip (binutils) optional; mknod
# needs root, otherwise fakeroot is used if installed, else the device
# nodes are left out (with a warning: the agent then relies on the kernel
# and opens /dev/console itself once devtmpfs is mounted).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
out="${EMBER_OUT_DIR:-/var/lib/ember}"
target=x86_64-unknown-linux-gnu

log() { echo "build-initrd: $*" >&2; }

if [ -n "${EMBER_AGENT_BIN:-}" ]; then
    agent="$EMBER_AGENT_BIN"
    log "using prebuilt agent $agent"
else
    log "building the static agent (release, $target)"
    # RUSTFLAGS replaces any build.rustflags from cargo config, and
    # CARGO_ENCODED_RUSTFLAGS would override RUSTFLAGS: drop it. --target
    # keeps build scripts and proc-macros dynamic (only the agent is static).
    (
        cd "$repo"
        unset CARGO_ENCODED_RUSTFLAGS
        RUSTFLAGS="-C target-feature=+crt-static" \
            cargo build --release -p ember-agent --target "$target" >&2
    )
    agent="${CARGO_TARGET_DIR:-$repo/target}/$target/release/ember-agent"
fi

if [ ! -x "$agent" ]; then
    log "agent binary $agent not found or not executable"
    exit 1
fi
if ! file -L "$agent" | grep -Eq 'statically linked|static-pie linked'; then
    log "$agent is not statically linked: $(file -L "$agent")"
    exit 1
fi

mkdir -p "$out"
stage="$(mktemp -d "$out/.initrd-stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
mkdir -p "$root"

if [ "${EMBER_NO_STRIP:-0}" != 1 ] && command -v strip >/dev/null; then
    strip -o "$root/init" "$agent"
else
    cp "$agent" "$root/init"
fi
chmod 0755 "$root/init"

for d in proc sys dev run tmp etc; do
    mkdir -p "$root/$d"
    chmod 0755 "$root/$d"
done
chmod 1777 "$root/tmp"

# Pack: device node (needs root), fixed mtimes, sorted names, owner 0:0,
# and --reproducible (GNU cpio >= 2.13: inode numbers and links made
# deterministic) when supported.
pack() {
    local root="$1" archive="$2" want_console="$3"
    if [ "$want_console" = 1 ]; then
        mknod -m 0600 "$root/dev/console" c 5 1
        mknod -m 0666 "$root/dev/null" c 1 3
    fi
    find "$root" -exec touch -h -d @0 {} +
    local repro=()
    if cpio --help 2>&1 | grep -q -- --reproducible; then
        repro=(--reproducible)
    fi
    (cd "$root" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
        cpio -o -H newc --owner=0:0 --quiet "${repro[@]}") >"$archive"
}

archive="$stage/initrd.img"
if [ "$(id -u)" = 0 ]; then
    pack "$root" "$archive" 1
elif command -v fakeroot >/dev/null; then
    fakeroot -- bash -c "$(declare -f pack); pack \"\$@\"" pack "$root" "$archive" 1
else
    log "WARNING: not root and no fakeroot: leaving /dev/console and /dev/null out of the archive"
    pack "$root" "$archive" 0
fi

dest="$out/initrd.img"
if [ -f "$dest" ] && cmp -s "$archive" "$dest"; then
    log "unchanged: $dest ($(stat -c %s "$dest") bytes)"
else
    mv -f "$archive" "$dest" # same file system: an atomic rename
    log "wrote $dest ($(stat -c %s "$dest") bytes)"
fi
echo "$dest"
