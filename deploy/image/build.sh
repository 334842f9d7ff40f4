#!/usr/bin/env bash
# `make image`: build the CPU image on this machine with no Docker engine and no registry.
#   1. the base image from Debian's packages (deploy/image/base.sh; kept when it exists);
#   2. the wheels of requirements.txt, made on the host from its pip cache (torch: the local
#      CPU wheel pip already finds), so the build installs offline and gets exactly the
#      host's versions;
#   3. `buildah bud` of the Dockerfile (vfs storage, chroot isolation: no daemon, no
#      privileges beyond root), the wheel folder mounted for `make install`; Docker's image
#      format, which keeps the HEALTHCHECK (OCI's has none).
# Needs root, buildah and debootstrap (Debian packages). docs/deploy.md, "Building here".
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${IMAGE:-localhost/magistream:cpu}
export BASE_IMAGE=${BASE_IMAGE:-localhost/magistream-base:bookworm}
PY=${PY:-.venv/bin/python}
WHEELS=${WHEELS:-.cache/image/wheels}

start=$(date +%s)
bash deploy/image/base.sh
echo "wheels: $WHEELS"
rm -rf "$WHEELS"  # afresh: a wheel left from older pins could win a transitive dependency
mkdir -p "$WHEELS"
"$PY" -m pip wheel -q -r requirements.txt -w "$WHEELS" 2>&1 | grep -v "is ignored" || true
echo "image $IMAGE: buildah bud from $BASE_IMAGE"
buildah --storage-driver vfs bud --isolation chroot --quiet --format docker \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg TORCH_INDEX= \
    --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_NO_INDEX=1 \
    --volume "$PWD/$WHEELS:/wheels:ro" \
    --tag "$IMAGE" --file Dockerfile . >/dev/null
size=$(buildah --storage-driver vfs images --format '{{.Size}}' "$IMAGE" | head -1)
echo "image $IMAGE: built in $(($(date +%s) - start)) s, $size"
