#!/bin/bash
# Registers Ember with the containerd found on this machine, for its
# version: containerd 1.6/1.7 (config version 2), 2.0-2.2 (version 3),
# 2.3+ (version 3 or 4). Used by deploy/install.sh and by the Kubernetes
# node installer (deploy/kubernetes/install-node.sh); runnable alone:
#
#   deploy/containerd/register.sh [--dry-run] [--node] [--unregister]
#
# - The root config (CONTAINERD_CONFIG, default /etc/containerd/config.toml)
#   is kept; only what Ember needs is added. When absent or empty it is
#   created: from `containerd config default` on a machine of its own
#   (deploy/install.sh), as a bare `version = N` with --node (a Kubernetes
#   node keeps running on containerd's built-in defaults).
# - containerd 2.x: Ember's runtime goes into a drop-in, conf.d/ember.toml
#   next to the root config, of the root config's version (a drop-in of a
#   higher version is an error; a lower one is migrated), from
#   deploy/containerd/ember-v{2,3,4}.toml, and the root config imports it.
# - containerd 1.6/1.7: into the root config, between marker lines. Their
#   `imports` replace a whole plugin section (a drop-in naming the CRI
#   plugin would wipe the root file's CRI settings), so no drop-in there.
# - Without --node, when no CRI sandbox image is configured, the local one
#   install.sh imports (localhost/pause:ember); and without
#   CAP_SYS_RESOURCE, restrict_oom_score_adj = true. A node keeps its own.
# - A root config that already defines runtimes.ember itself is left alone.
# - A config version this containerd cannot read is an error that names the
#   fix (`containerd config migrate`), and nothing is changed.
# - --unregister undoes it: the marker block, the drop-in and its
#   `imports` entry (the rest of the config is left as it is).
#
# Environment: CONTAINERD_CONFIG (the path containerd reads), CONTAINERD_BIN
# (a command that runs the node's containerd, default `containerd`),
# HOST_ROOT (where the node's root is mounted when this runs in a
# container, default none: files are read and written under it, paths
# written into the config are the node's).
# Prints "changed" on stdout when containerd must be restarted.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cfg_path="${CONTAINERD_CONFIG:-/etc/containerd/config.toml}"
host_root="${HOST_ROOT:-}"
cfg="$host_root$cfg_path"
containerd_bin="${CONTAINERD_BIN:-containerd}"
dry_run=0 node=0 unregister=0
for arg in "$@"; do
    case "$arg" in
    --dry-run) dry_run=1 ;;
    --node) node=1 ;;
    --unregister) unregister=1 ;;
    *)
        echo "usage: $0 [--dry-run] [--node] [--unregister]" >&2
        exit 2
        ;;
    esac
done

log() { echo "register: $*" >&2; }
die() {
    echo "register: error: $*" >&2
    exit 1
}

# major.minor of the containerd binary.
containerd_version() {
    $containerd_bin --version 2>/dev/null |
        grep -oE '[[:space:]]v?[0-9]+\.[0-9]+' | head -n1 | tr -d ' v'
}

# The `version = N` of a config file (1 when absent: containerd's rule).
config_version() {
    local v
    v="$(sed -n 's/^[[:space:]]*version[[:space:]]*=[[:space:]]*\([0-9]\+\).*/\1/p' "$1" 2>/dev/null | head -n1)"
    echo "${v:-1}"
}

dropin_path="$(dirname "$cfg_path")/conf.d/ember.toml"
dropin="$host_root$dropin_path"
# Every BEGIN line Ember ever wrote starts so (install-node.sh's older
# "managed by ember-deploy" block included).
begin_prefix="# BEGIN ember runtime"
begin_mark="$begin_prefix (deploy/containerd/register.sh)"
end_mark="# END ember runtime"
changed=0

has_block() { [ -f "$cfg" ] && grep -q "^$begin_prefix" "$cfg"; }

# Drops the marker block (any Ember ever wrote) from the root config.
remove_block() {
    awk -v b="$begin_prefix" -v e="$end_mark" '
        index($0, b) == 1 { skip = 1; next }
        skip && $0 == e { skip = 0; next }
        !skip' "$cfg" >"$cfg.ember.$$"
    mv -f "$cfg.ember.$$" "$cfg"
}

if [ "$unregister" = 1 ]; then
    if has_block; then
        log "removing the ember runtime block from $cfg_path"
        [ "$dry_run" = 1 ] || remove_block
        changed=1
    fi
    if [ -f "$cfg" ] && grep -E '^[[:space:]]*imports[[:space:]]*=' "$cfg" | grep -qF "\"$dropin_path\""; then
        log "removing $dropin_path from the imports of $cfg_path"
        if [ "$dry_run" = 0 ]; then
            # The entry with the comma that joined it to a neighbour.
            sed -i -E "/^[[:space:]]*imports[[:space:]]*=/{s#\"$dropin_path\",[[:space:]]*##;s#,[[:space:]]*\"$dropin_path\"##;s#\"$dropin_path\"##}" "$cfg"
            # An imports list Ember added alone goes with it.
            sed -i -E '/^[[:space:]]*imports[[:space:]]*=[[:space:]]*\[[[:space:]]*\][[:space:]]*$/d' "$cfg"
        fi
        changed=1
    fi
    if [ -f "$dropin" ]; then
        log "removing $dropin_path"
        [ "$dry_run" = 1 ] || { rm -f "$dropin"; rmdir "$(dirname "$dropin")" 2>/dev/null || true; }
        changed=1
    fi
    [ "$changed" = 0 ] || echo changed
    exit 0
fi

cv="$(containerd_version || true)"
[ -n "$cv" ] || die "cannot tell the version of '$containerd_bin' (is containerd installed?)"
major="${cv%%.*}"
minor="${cv#*.}"
case "$major" in
1) min=2 max=2 ;;
2) min=2 max=3; [ "$minor" -ge 3 ] && max=4 ;;
*) die "containerd $cv is newer than this script knows (1.6 to 2.3)" ;;
esac
log "containerd $cv (config versions up to $max)"

if [ ! -s "$cfg" ]; then
    if [ "$node" = 1 ]; then
        # containerd's own default version for this release.
        v=2
        [ "$major" = 1 ] || v=3
        [ "$max" -lt 4 ] || v=4
        log "no $cfg_path: writing a version-$v config (containerd's defaults otherwise)"
        if [ "$dry_run" = 0 ]; then
            mkdir -p "$(dirname "$cfg")"
            printf 'version = %s\n' "$v" >"$cfg"
        fi
    else
        log "no $cfg_path: writing containerd $cv's defaults"
        if [ "$dry_run" = 0 ]; then
            mkdir -p "$(dirname "$cfg")"
            # The CNI plugins where Debian puts them; the sandbox image is
            # set below (containerd's default lives in a registry).
            $containerd_bin config default |
                sed -e 's#"/opt/cni/bin"#"/usr/lib/cni"#' \
                    -e '/^[[:space:]]*sandbox_image[[:space:]]*=/d' \
                    -e "/^[[:space:]]*sandbox[[:space:]]*=[[:space:]]*[\"']registry/d" >"$cfg"
        fi
    fi
    changed=1
fi
version="$(config_version "$cfg")"
if [ "$version" -gt "$max" ]; then
    die "$cfg_path is config version $version; containerd $cv reads up to $max: nothing changed"
fi
if [ "$version" -lt "$min" ]; then
    die "$cfg_path is config version $version: migrate it first ('containerd config migrate > new.toml'): nothing changed"
fi
case "$version" in
2) runtimes='plugins."io.containerd.grpc.v1.cri".containerd.runtimes' ;;
*) runtimes='plugins."io.containerd.cri.v1.runtime".containerd.runtimes' ;;
esac

# Table headers compared without quotes (containerd 2.x writes '...').
if grep -q "runtimes\.ember[\"']\?\]" "$cfg" && ! has_block; then
    if tr -d "\"'" <"$cfg" | grep -qF "[$(printf '%s' "$runtimes" | tr -d "\"'").ember]"; then
        log "$cfg_path registers ember itself: left as is"
    else
        log "WARNING: $cfg_path has an ember runtime under a section containerd $cv ignores at config version $version; 'ember check' names the fix"
    fi
else
    want="$(cat "$here/ember-v$version.toml")"
    if [ "$major" = 1 ]; then
        block="$(
            printf '%s\n' "$begin_mark"
            printf '%s\n' "$want" | grep -v '^version[[:space:]]*='
            printf '%s\n' "$end_mark"
        )"
        current="$(awk -v b="$begin_prefix" -v e="$end_mark" '
            index($0, b) == 1 { on = 1 } on { print } on && $0 == e { on = 0 }' "$cfg")"
        if [ "$current" != "$block" ]; then
            log "adding the ember runtime to $cfg_path (between '$begin_mark' lines)"
            if [ "$dry_run" = 0 ]; then
                remove_block
                [ -z "$(tail -c1 "$cfg")" ] || printf '\n' >>"$cfg"
                printf '%s\n' "$block" >>"$cfg"
            fi
            changed=1
        fi
    else
        if [ ! -f "$dropin" ] || [ "$(cat "$dropin")" != "$want" ]; then
            log "writing $dropin_path (config version $version)"
            if [ "$dry_run" = 0 ]; then
                mkdir -p "$(dirname "$dropin")"
                printf '%s\n' "$want" >"$dropin"
            fi
            changed=1
        fi
        # The root config must import the drop-in.
        if grep -qE '^[[:space:]]*imports[[:space:]]*=' "$cfg"; then
            if ! grep -E '^[[:space:]]*imports[[:space:]]*=' "$cfg" | grep -qF -e "$dropin_path" -e "$(dirname "$dropin_path")/*.toml"; then
                log "adding $dropin_path to the imports of $cfg_path"
                [ "$dry_run" = 1 ] || sed -i -E "0,/^([[:space:]]*imports[[:space:]]*=[[:space:]]*\[)[[:space:]]*(\]?)/s##\1\"$dropin_path\"\2#" "$cfg"
                # A non-empty list got `"x"` glued to its first entry: comma.
                [ "$dry_run" = 1 ] || sed -i -E "s#\"$dropin_path\"([\"'])#\"$dropin_path\", \1#" "$cfg"
                changed=1
            fi
        else
            log "adding imports = [\"$dropin_path\"] to $cfg_path"
            # Top-level keys go before the first table: after `version`.
            [ "$dry_run" = 1 ] || sed -i "0,/^[[:space:]]*version[[:space:]]*=.*/s##&\nimports = [\"$dropin_path\"]#" "$cfg"
            changed=1
        fi
    fi
fi

# A Kubernetes node keeps its own sandbox image and OOM settings.
if [ "$node" = 1 ]; then
    [ "$changed" = 0 ] || echo changed
    exit 0
fi

# CRI needs a sandbox ("pause") image; containerd's default lives in a
# registry. When none is configured, use the local one install.sh imports.
if [ "$version" = 2 ]; then
    if ! grep -q '^[[:space:]]*sandbox_image' "$cfg"; then
        log "CRI sandbox image: localhost/pause:ember"
        if [ "$dry_run" = 0 ]; then
            if grep -q '^[[:space:]]*\[plugins\."io\.containerd\.grpc\.v1\.cri"\]' "$cfg"; then
                sed -i '0,/^[[:space:]]*\[plugins\."io\.containerd\.grpc\.v1\.cri"\]/s//&\n    sandbox_image = "localhost\/pause:ember"/' "$cfg"
            else
                printf '\n[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "localhost/pause:ember"\n' >>"$cfg"
            fi
        fi
        changed=1
    fi
elif ! grep -qE '^[[:space:]]*sandbox[[:space:]]*=' "$cfg"; then
    log "CRI sandbox image: localhost/pause:ember"
    if [ "$dry_run" = 0 ]; then
        pinned="^[[:space:]]*\[plugins\.[\"']io\.containerd\.cri\.v1\.images[\"']\.pinned_images\]"
        if grep -q "$pinned" "$cfg"; then
            sed -i "0,/$pinned/s//&\n      sandbox = \"localhost\/pause:ember\"/" "$cfg"
        else
            printf '\n[plugins."io.containerd.cri.v1.images".pinned_images]\n  sandbox = "localhost/pause:ember"\n' >>"$cfg"
        fi
    fi
    changed=1
fi

# Without CAP_SYS_RESOURCE (containers, some CI machines) CRI pods fail
# unless oom_score_adj is restricted.
capbnd="$(awk '/^CapBnd/ {print $2}' /proc/self/status)"
if (( ((16#$capbnd) >> 24 & 1) == 0 )) && grep -q 'restrict_oom_score_adj = false' "$cfg"; then
    log "no CAP_SYS_RESOURCE: restrict_oom_score_adj = true"
    [ "$dry_run" = 1 ] || sed -i 's/restrict_oom_score_adj = false/restrict_oom_score_adj = true/' "$cfg"
    changed=1
fi
[ "$changed" = 0 ] || echo changed
