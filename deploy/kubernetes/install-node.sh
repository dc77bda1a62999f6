#!/bin/bash
# Installs (or removes) Ember on the Kubernetes node this runs on. Run by
# the ember-deploy DaemonSet (ember-deploy.yaml) in a privileged container
# with hostPID and these host paths mounted (host path -> container path):
#   /etc/containerd    -> /host/etc/containerd
#   /usr/local/bin     -> /host/usr/local/bin
#   /var/lib/ember     -> /host/var/lib/ember
#   /etc/ember         -> /host/etc/ember
# and the artifacts in the image under $ARTIFACTS (default
# /opt/ember-artifacts):
#   bin/containerd-shim-ember-v2  bin/ember  vmlinux  initrd.img
#   config.toml  register.sh  ember-v2.toml  ember-v3.toml  ember-v4.toml
#   (deploy/containerd/)
#
#   install-node.sh install   copy the artifacts to the host, register the
#                             `ember` runtime for the node's containerd
#                             version (register.sh --node), restart
#                             containerd, label the node; then (as the
#                             DaemonSet's main process) wait, and clean up
#                             on SIGTERM
#   install-node.sh cleanup   undo what install did (kept while Ember pods
#                             still run on the node, see below)
#   install-node.sh check     report what is installed, change nothing
#
# Environment: NODE_NAME (downward API; for the node label), ARTIFACTS,
# HOST (prefix of the host mounts, default /host), EMBER_LABEL (default
# ember.io/runtime), CONTAINERD_CONFIG (host path, default
# /etc/containerd/config.toml), CONTAINERD_BIN (how to run the node's
# containerd, default: `containerd` in the host's namespaces through
# nsenter), EMBER_INSTALL_ONLY=1 (install, then exit instead of waiting).
set -euo pipefail

ARTIFACTS="${ARTIFACTS:-/opt/ember-artifacts}"
HOST="${HOST:-/host}"
EMBER_LABEL="${EMBER_LABEL:-ember.io/runtime}"
CONTAINERD_CONFIG="${CONTAINERD_CONFIG:-/etc/containerd/config.toml}"
CFG="${HOST}${CONTAINERD_CONFIG}"
SHIM=containerd-shim-ember-v2

log() { printf 'ember-deploy: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Runs a command in the host's mount namespace (PID 1's; needs hostPID).
on_host() { nsenter --target 1 --mount --uts --ipc --net --pid -- "$@"; }

# Copies $1 to $2 atomically: a running shim binary is never overwritten in
# place (ETXTBSY), and a half-copied kernel is never seen.
install_file() {
    local src="$1" dst="$2" mode="$3" tmp
    [ -f "$src" ] || die "missing artifact $src"
    mkdir -p "$(dirname "$dst")"
    tmp="$(dirname "$dst")/.$(basename "$dst").ember-deploy.$$"
    cp "$src" "$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dst"
}

# Registers (or, with --unregister, removes) the `ember` runtime in the
# node's containerd config, for the node's containerd version (1.6/1.7:
# the root config between marker lines; 2.x: a drop-in conf.d/ember.toml of
# the root config's version, imported by it), with the same script as
# deploy/install.sh. Returns 0 when containerd must reread its config.
register() {
    local out
    out="$(HOST_ROOT="$HOST" CONTAINERD_CONFIG="$CONTAINERD_CONFIG" \
        CONTAINERD_BIN="${CONTAINERD_BIN:-nsenter --target 1 --mount --uts --ipc --net --pid -- containerd}" \
        "$ARTIFACTS/register.sh" --node "$@")" || die "registering Ember with containerd failed (see above)"
    [ "$out" = changed ]
}

has_registration() {
    [ -f "$CFG" ] && grep -q '^# BEGIN ember runtime' "$CFG" && return 0
    [ -f "$(dirname "$CFG")/conf.d/ember.toml" ]
}

containerd_restart() {
    if [ -d /proc/1/root/run/systemd/system ]; then
        log "restarting containerd (systemctl, in the host's namespaces)"
        on_host systemctl daemon-reload || true
        on_host systemctl restart containerd
        local _
        for _ in $(seq 1 60); do
            if on_host systemctl is-active --quiet containerd; then
                log "containerd is active again"
                return 0
            fi
            sleep 1
        done
        die "containerd did not come back within 60 s (journalctl -u containerd on the node)"
    fi
    die "the node does not run systemd: restart containerd by hand to load the ember runtime"
}

label_node() { # value, or "-" to remove the label
    if [ -z "${NODE_NAME:-}" ] || ! command -v kubectl >/dev/null; then
        log "no NODE_NAME or no kubectl in the image: node label $EMBER_LABEL not changed"
        return 0
    fi
    if [ "$1" = "-" ]; then
        kubectl label node "$NODE_NAME" "${EMBER_LABEL}-" >/dev/null 2>&1 || true
    else
        kubectl label node "$NODE_NAME" --overwrite "${EMBER_LABEL}=$1" >/dev/null
    fi
}

# Ember shim processes running on the node (pods still using Ember).
# (pgrep -x would compare the 15-character process name: match argv[0].)
running_shims() { pgrep -f "(^|/)${SHIM}( |\$)" 2>/dev/null | wc -l; }

preflight() {
    [ -e /dev/kvm ] || die "/dev/kvm is absent on this node: Ember needs KVM (node not labeled, nothing installed)"
    [ -d "$HOST/etc/containerd" ] || die "$HOST/etc/containerd is not mounted"
    [ -d "$HOST/usr/local/bin" ] || die "$HOST/usr/local/bin is not mounted"
    local f
    for f in bin/$SHIM bin/ember vmlinux initrd.img config.toml register.sh \
        ember-v2.toml ember-v3.toml ember-v4.toml; do
        [ -f "$ARTIFACTS/$f" ] || die "image lacks $ARTIFACTS/$f"
    done
}

do_install() {
    preflight
    log "installing the shim and the ember CLI into /usr/local/bin"
    install_file "$ARTIFACTS/bin/$SHIM" "$HOST/usr/local/bin/$SHIM" 0755
    install_file "$ARTIFACTS/bin/ember" "$HOST/usr/local/bin/ember" 0755
    log "installing the guest kernel and initrd into /var/lib/ember"
    install_file "$ARTIFACTS/vmlinux" "$HOST/var/lib/ember/vmlinux" 0644
    install_file "$ARTIFACTS/initrd.img" "$HOST/var/lib/ember/initrd.img" 0644
    mkdir -p "$HOST/etc/ember"
    if [ -f "$HOST/etc/ember/config.toml" ]; then
        log "/etc/ember/config.toml exists: kept"
    else
        install_file "$ARTIFACTS/config.toml" "$HOST/etc/ember/config.toml" 0644
    fi
    if register; then
        containerd_restart
    else
        log "containerd config unchanged: no restart"
    fi
    if ! on_host /usr/local/bin/ember check >&2; then
        label_node "-"
        die "'ember check' failed on the node (see above): node not labeled"
    fi
    label_node true
    log "installed; RuntimeClass ember (handler ember) can run pods on this node"
}

do_cleanup() {
    label_node "-"
    local n
    n="$(running_shims)"
    if [ "$n" -gt 0 ]; then
        # containerd needs the shim binary and the runtime config to stop
        # and delete those pods; removing them now would strand the pods.
        log "$n Ember shim process(es) still run on this node: binaries and containerd config kept (label removed; drain the node, then run cleanup again)"
        return 0
    fi
    if register --unregister; then
        containerd_restart
    fi
    rm -f "$HOST/usr/local/bin/$SHIM" "$HOST/usr/local/bin/ember"
    rm -f "$HOST/var/lib/ember/vmlinux" "$HOST/var/lib/ember/initrd.img"
    rmdir "$HOST/var/lib/ember" 2>/dev/null || true
    if [ -f "$HOST/etc/ember/config.toml" ] && cmp -s "$ARTIFACTS/config.toml" "$HOST/etc/ember/config.toml"; then
        rm -f "$HOST/etc/ember/config.toml"
        rmdir "$HOST/etc/ember" 2>/dev/null || true
    else
        log "/etc/ember/config.toml was changed on the node: kept"
    fi
    log "cleaned up"
}

# Exits 1 unless everything install puts in place is there (the
# DaemonSet's readiness probe).
do_check() {
    local f missing=0
    for f in "$HOST/usr/local/bin/$SHIM" "$HOST/usr/local/bin/ember" \
        "$HOST/var/lib/ember/vmlinux" "$HOST/var/lib/ember/initrd.img" \
        "$HOST/etc/ember/config.toml"; do
        if [ -e "$f" ]; then
            echo "present $f"
        else
            echo "absent  $f"
            missing=1
        fi
    done
    if has_registration; then
        echo "present ember runtime in $CONTAINERD_CONFIG (or its conf.d/ember.toml)"
    elif [ -f "$CFG" ] && grep -q 'runtimes\.ember\]' "$CFG"; then
        echo "present ember runtime in $CONTAINERD_CONFIG (not managed by ember-deploy)"
    else
        echo "absent  ember runtime in $CONTAINERD_CONFIG"
        missing=1
    fi
    echo "running ember shims: $(running_shims)"
    return "$missing"
}

case "${1:-}" in
install)
    do_install
    if [ "${EMBER_INSTALL_ONLY:-0}" = 1 ]; then
        exit 0
    fi
    # The DaemonSet pod stays up; deleting it (uninstall) sends SIGTERM.
    trap 'log "SIGTERM: cleaning up"; do_cleanup; exit 0' TERM INT
    sleep infinity &
    wait $!
    ;;
cleanup) do_cleanup ;;
check) do_check ;;
*)
    echo "usage: $0 install|cleanup|check" >&2
    exit 2
    ;;
esac
