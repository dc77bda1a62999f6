#!/bin/bash
# Fetches containerd 2.1.9 (Debian's `containerd` package from the unstable
# suite; it needs only libc6 >= 2.34 and runc, so it runs on Debian 12) and
# unpacks it into a cache directory, for the end-to-end tests against
# containerd 2.x (README "containerd versions"). Prints the path of its
# `containerd` binary. Idempotent: a cached copy is reused.
#
# The system's apt sources are never changed: a private sources list names
# the unstable suite of the Debian mirror the system already uses (read
# from /etc/apt at run time), with private lists and cache directories.
#
# EMBER_CONTAINERD2_DIR overrides the cache (default
# /var/cache/ember/containerd-2.1.9).
set -euo pipefail

version=2.1.9
dir="${EMBER_CONTAINERD2_DIR:-/var/cache/ember/containerd-$version}"
bin="$dir/root/usr/bin/containerd"
if [ -x "$bin" ] && "$bin" --version | grep -q " v\?$version"; then
    echo "$bin"
    exit 0
fi

# The system's Debian mirror: deb822 (.sources) or one-line format.
mirror="$(
    { cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p'
      cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
          sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p'
    } | tr ' ' '\n' | grep -E '/debian/?$' | head -n1
)" || true
if [ -z "$mirror" ]; then
    echo "containerd2.sh: no Debian mirror in /etc/apt/sources.list*" >&2
    exit 1
fi
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

work="$dir/apt"
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$dir/root"
echo "deb [signed-by=$keyring] $mirror unstable main" >"$work/sources.list"
apt_opts=(
    -o "Dir::Etc::SourceList=$work/sources.list"
    -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache"
    -o Debug::NoLocking=1
)
echo "containerd2.sh: fetching containerd $version from $mirror unstable" >&2
apt-get "${apt_opts[@]}" -q update >&2
(cd "$work" && rm -f containerd_*.deb && apt-get "${apt_opts[@]}" -q download "containerd=$version*" >&2)
dpkg -x "$work"/containerd_"$version"*.deb "$dir/root"
rm -rf "$work"
"$bin" --version >&2
echo "$bin"
