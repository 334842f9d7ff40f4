#!/usr/bin/env bash
# A local Debian 12 (bookworm) base image made from Debian's packages alone, for machines that
# reach no image registry: debootstrap writes a minimal root file system (what debian:12-slim
# holds), and buildah turns it into the image $BASE_IMAGE. Kept when it exists (FORCE=1 remakes
# it). Needs root, buildah and debootstrap (Debian packages). docs/deploy.md, "Building here".
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-localhost/magistream-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BUILDAH=(buildah --storage-driver vfs)

if [ "${FORCE:-0}" != 1 ] && "${BUILDAH[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "base image $BASE_IMAGE: exists (FORCE=1 remakes it)"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "base image $BASE_IMAGE: debootstrap bookworm from $MIRROR"
debootstrap --variant=minbase bookworm "$work/root" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
    tail -20 "$work/debootstrap.log" >&2
    exit 1
}
# what a slim image leaves out: package lists and caches (the build runs apt-get update itself)
rm -rf "$work/root/var/lib/apt/lists/"* "$work/root/var/cache/apt/"*.bin "$work/root/var/log/"*
tar -C "$work/root" --numeric-owner -cf "$work/root.tar" .

container=$("${BUILDAH[@]}" from scratch)
"${BUILDAH[@]}" add "$container" "$work/root.tar" / >/dev/null
"${BUILDAH[@]}" config --cmd /bin/bash --env LANG=C.UTF-8 \
    --label org.opencontainers.image.description="Debian 12 minbase, made by debootstrap" \
    "$container"
"${BUILDAH[@]}" commit --quiet --rm "$container" "$BASE_IMAGE" >/dev/null
echo "base image $BASE_IMAGE: made ($(du -sh "$work/root" | cut -f1) root file system)"
