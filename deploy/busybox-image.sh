#!/bin/bash
# Builds local OCI images without a registry, from one uncompressed layer
# holding Debian's static busybox and its applets:
#   localhost/busybox:test   Cmd ["sh"]
#   localhost/pause:ember    Entrypoint ["/bin/sleep", "infinity"] (a CRI
#                            sandbox image for hosts that cannot pull one)
# and imports them into containerd's namespace(s) given as arguments
# (default: default).
#   deploy/busybox-image.sh [namespace...]
# Env: CTR_ADDRESS (containerd socket), EMBER_IMAGE_OUT (keep the tar here).
set -euo pipefail

busybox="${BUSYBOX:-/bin/busybox}"
[ -x "$busybox" ] || { echo "busybox-image: $busybox not found (apt-get install busybox-static)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

root="$work/rootfs"
mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev,root,var/run}
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
: > "$root/etc/hosts"; : > "$root/etc/resolv.conf"

layout="$work/oci"
mkdir -p "$layout/blobs/sha256"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$root" -cf "$work/layer.tar" .
layer_digest="$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
layer_size="$(stat -c %s "$work/layer.tar")"
mv "$work/layer.tar" "$layout/blobs/sha256/$layer_digest"

blob() { # write stdin as a blob, print "digest size"
    local tmp="$work/blob"; cat > "$tmp"
    local d; d="$(sha256sum "$tmp" | cut -d' ' -f1)"
    local s; s="$(stat -c %s "$tmp")"
    mv "$tmp" "$layout/blobs/sha256/$d"; echo "$d $s"
}

# One manifest per image, both on the same layer.
manifest() { # name config-json-fragment → prints an index.json manifest entry
    local name="$1" cfg="$2" cd cs md ms
    read -r cd cs < <(printf '%s' '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],'"$cfg"',"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:'"$layer_digest"'"]},"history":[{"created_by":"ember deploy/busybox-image.sh"}]}' | blob)
    read -r md ms < <(printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$cd"'","size":'"$cs"'},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:'"$layer_digest"'","size":'"$layer_size"'}]}' | blob)
    printf '%s' '{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$md"'","size":'"$ms"',"annotations":{"io.containerd.image.name":"'"$name"'","org.opencontainers.image.ref.name":"'"${name##*:}"'"}}'
}
busybox_entry="$(manifest localhost/busybox:test '"Cmd":["sh"]')"
pause_entry="$(manifest localhost/pause:ember '"Entrypoint":["/bin/sleep","infinity"]')"
printf '%s' '{"schemaVersion":2,"manifests":['"$busybox_entry,$pause_entry"']}' > "$layout/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"
out="${EMBER_IMAGE_OUT:-$work/busybox.tar}"
tar --sort=name --mtime=@0 --owner=0 --group=0 -C "$layout" -cf "$out" .

namespaces=("$@"); [ "${#namespaces[@]}" -gt 0 ] || namespaces=(default)
for ns in "${namespaces[@]}"; do
    ctr ${CTR_ADDRESS:+--address "$CTR_ADDRESS"} -n "$ns" images import "$out" >/dev/null
    echo "busybox-image: localhost/busybox:test and localhost/pause:ember imported into namespace $ns"
done
