#!/bin/bash
# Sets up Ember on this machine (Debian 12, root):
#   - Debian packages (deploy/install-deps.sh)
#   - guest kernel and initrd → /var/lib/ember/{vmlinux,initrd.img}
#   - containerd-shim-ember-v2 and ember → /usr/local/bin
#   - /etc/ember/config.toml (kept if present)
#   - the `ember` runtime in /etc/containerd/config.toml, containerd (re)started
#   - the demo image localhost/busybox:test imported
# Then: ctr run --rm --runtime io.containerd.ember.v2 localhost/busybox:test demo echo hello
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/install-deps.sh
deploy/build-kernel.sh
deploy/build-initrd.sh

echo "install: building the shim (release)"
cargo build --release -p containerd-shim-ember-v2 --bins
target="${CARGO_TARGET_DIR:-target}/release"
install -m 0755 "$target/containerd-shim-ember-v2" /usr/local/bin/containerd-shim-ember-v2
install -m 0755 "$target/ember" /usr/local/bin/ember
mkdir -p /etc/ember
[ -f /etc/ember/config.toml ] || install -m 0644 deploy/config.toml /etc/ember/config.toml

# containerd config: keep the user's, add what Ember needs once.
mkdir -p /etc/containerd
cfg=/etc/containerd/config.toml
if [ ! -s "$cfg" ]; then
    containerd config default > "$cfg"
fi
if ! grep -q 'runtimes.ember\]' "$cfg"; then
    printf '\n' >> "$cfg"
    cat deploy/containerd/ember-runtime.toml >> "$cfg"
fi
# Without CAP_SYS_RESOURCE (containers, some CI machines) CRI pods fail
# unless oom_score_adj is restricted.
capbnd="$(awk '/^CapBnd/ {print $2}' /proc/self/status)"
if (( ((16#$capbnd) >> 24 & 1) == 0 )); then
    sed -i 's/restrict_oom_score_adj = false/restrict_oom_score_adj = true/' "$cfg"
fi

restart_containerd() {
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        systemctl restart containerd
    else
        pkill -x containerd 2>/dev/null && sleep 1 || true
        nohup containerd >/var/log/containerd.log 2>&1 &
    fi
    for _ in $(seq 50); do ctr version >/dev/null 2>&1 && return 0; sleep 0.2; done
    echo "install: containerd did not come up (see /var/log/containerd.log)" >&2
    return 1
}
restart_containerd
deploy/busybox-image.sh default
ember check || true
echo "install: done. Try: ctr run --rm --runtime io.containerd.ember.v2 localhost/busybox:test demo echo hello"
