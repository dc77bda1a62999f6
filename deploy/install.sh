#!/bin/bash
# Sets up Ember on this machine (Debian 12, root):
#   - Debian packages (deploy/install-deps.sh)
#   - guest kernel and initrd → /var/lib/ember/{vmlinux,initrd.img}
#   - containerd-shim-ember-v2 and ember → /usr/local/bin
#   - /etc/ember/config.toml (kept if present)
#   - the `ember` runtime for the containerd found here (1.6, 1.7, 2.x;
#     deploy/containerd/register.sh), containerd (re)started when that
#     changed its config: systemd's unit, else the daemon serving
#     /run/containerd/containerd.sock (no other containerd is touched)
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

# containerd config, for the containerd found here (1.6/1.7: version 2 in
# the root file; 2.x: a drop-in of the root file's version 2, 3 or 4), the
# user's settings kept; the local sandbox image when none is configured.
registered="$(deploy/containerd/register.sh)"
# A pod network for CRI pods when the machine has none (a Kubernetes node
# gets its CNI from the cluster and keeps it).
cni_dir=/etc/cni/net.d
if ! ls "$cni_dir"/*.conf "$cni_dir"/*.conflist >/dev/null 2>&1; then
    mkdir -p "$cni_dir"
    install -m 0644 deploy/cni/10-ember-bridge.conflist "$cni_dir/10-ember-bridge.conflist"
    echo "install: CNI network ember-bridge (10.89.0.0/16 on bridge ember0) in $cni_dir"
fi
# The system's containerd: the one serving /run/containerd/containerd.sock
# (never another instance, such as a test's private containerd).
system_containerd_pid() {
    ss -xlpn 2>/dev/null |
        awk '$5 ~ /^(\/var)?\/run\/containerd\/containerd\.sock$/ { if (match($0, /pid=[0-9]+/)) print substr($0, RSTART + 4, RLENGTH - 4) }' |
        head -n1
}

restart_containerd() {
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        systemctl restart containerd
    else
        local pid
        pid="$(system_containerd_pid)"
        if [ -n "$pid" ]; then
            echo "install: restarting containerd (pid $pid)"
            kill -TERM "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        nohup containerd >/var/log/containerd.log 2>&1 &
    fi
    for _ in $(seq 50); do ctr version >/dev/null 2>&1 && return 0; sleep 0.2; done
    echo "install: containerd did not come up (see /var/log/containerd.log)" >&2
    return 1
}
if [ -n "$registered" ] || [ -z "$(system_containerd_pid)" ]; then
    restart_containerd
fi
deploy/busybox-image.sh default k8s.io
ember check || true
echo "install: done. Try: ctr run --rm --runtime io.containerd.ember.v2 localhost/busybox:test demo echo hello"
