#!/bin/bash
# Sets up Ember on this machine (Debian 12, root):
#   - Debian packages (deploy/install-deps.sh)
#   - guest kernel and initrd → /var/lib/ember/{vmlinux,initrd.img}
#   - containerd-shim-ember-v2 and ember → /usr/local/bin
#   - /etc/ember/config.toml (kept if present)
#   - the `ember` runtime in /etc/containerd/config.toml, containerd (re)started
#   - for CRI on a machine that cannot pull images: a local sandbox image
#     (only if none is configured) and a CNI bridge network (only if
#     /etc/cni/net.d has none); see "Kubernetes / CRI" in README.md
#   - the demo images localhost/busybox:test and localhost/pause:ember
#     imported (namespaces default and k8s.io)
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
    # containerd's defaults, with the CNI plugins where Debian puts them and
    # the local sandbox image (below) instead of a registry's.
    containerd config default \
        | sed -e 's#bin_dir = "/opt/cni/bin"#bin_dir = "/usr/lib/cni"#' \
              -e '/^[[:space:]]*sandbox_image/d' > "$cfg"
fi
if ! grep -q 'runtimes.ember\]' "$cfg"; then
    printf '\n' >> "$cfg"
    cat deploy/containerd/ember-runtime.toml >> "$cfg"
fi
# CRI needs a sandbox ("pause") image; containerd's default lives in a
# registry. When none is configured, use the local one imported below.
if ! grep -q '^[[:space:]]*sandbox_image' "$cfg"; then
    if grep -q '^[[:space:]]*\[plugins\."io\.containerd\.grpc\.v1\.cri"\]' "$cfg"; then
        sed -i '0,/^[[:space:]]*\[plugins\."io\.containerd\.grpc\.v1\.cri"\]/s//&\n    sandbox_image = "localhost\/pause:ember"/' "$cfg"
    else
        printf '\n[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "localhost/pause:ember"\n' >> "$cfg"
    fi
    echo "install: CRI sandbox image set to localhost/pause:ember"
fi
# A pod network for CRI pods when the machine has none (a Kubernetes node
# gets its CNI from the cluster and keeps it).
cni_dir=/etc/cni/net.d
if ! ls "$cni_dir"/*.conf "$cni_dir"/*.conflist >/dev/null 2>&1; then
    mkdir -p "$cni_dir"
    install -m 0644 deploy/cni/10-ember-bridge.conflist "$cni_dir/10-ember-bridge.conflist"
    echo "install: CNI network ember-bridge (10.89.0.0/16 on bridge ember0) in $cni_dir"
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
deploy/busybox-image.sh default k8s.io
ember check || true
echo "install: done. Try: ctr run --rm --runtime io.containerd.ember.v2 localhost/busybox:test demo echo hello"
