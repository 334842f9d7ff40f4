#!/usr/bin/env bash
# Prepare the GPU check (bench/gpu_check.py, docs/gpu.md) for a lent GPU machine: download into
# .whl/ the wheels of the packages that machine lacks, at exactly the versions requirements.txt
# pins (CPython 3.12, manylinux x86-64: the device's Python), then print the `run` call that
# installs them to /tmp/site and runs the check. Run it here, where PyPI can be reached:
#
#     bash bench/gpu_prepare.sh
#
# The device image has torch (its own CUDA build), transformers, safetensors, numpy,
# sentencepiece, prometheus-client and uvloop (.library/device/KINDS.md); the names below are
# what the server, the client and the model import beyond those. protobuf and grpcio travel too:
# the generated proto/ code refuses an older runtime than the one it was generated with.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
LIMIT_MIB=64  # the working tree and carried paths travel together, 64 MiB at most
PACKAGES=(av grpcio grpcio-health-checking grpcio-reflection protobuf websockets ftfy
	beautifulsoup4 soupsieve)
# dependencies of those that requirements.txt does not pin: the versions our venv resolved
EXTRA=(wcwidth==0.2.14)
PIP=${PIP:-.venv/bin/python -m pip}

pins=()
for name in "${PACKAGES[@]}"; do
	pin=$(grep -iE "^${name}==" requirements.txt || true)
	if [ -z "$pin" ]; then
		echo "gpu_prepare: $name is not pinned in requirements.txt; pin it there first" >&2
		exit 1
	fi
	pins+=("$pin")
done
pins+=("${EXTRA[@]}")

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
# manylinux tags pip must match exactly; av and grpcio ship manylinux_2_17/2_28 wheels
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
	manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
	platforms+=(--platform "$tag")
done
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	"${platforms[@]}" -d "$WHEELS" "${pins[@]}" 2>&1 | grep -v "is ignored" || true

# PyAV's wheel (36 MB: ffmpeg's libraries) would take the call over 64 MiB with the working
# tree; its files xz-compressed are 25 MB. The device unpacks them into /tmp/site, where pip
# puts the other wheels: the same files in the same layout.
av_wheel=$(ls "$WHEELS"/av-*.whl)
av_name=$(basename "$av_wheel" | cut -d- -f1-2)
unpacked=$(mktemp -d)
trap 'rm -rf "$unpacked"' EXIT
python3 -m zipfile -e "$av_wheel" "$unpacked"
echo "compressing $av_name (about a minute) ..."
tar -C "$unpacked" -cf - . | xz -9 -T0 >"$WHEELS/$av_name.tar.xz"
rm "$av_wheel"

# One version of each package, or the install there stops.
dupes=$(ls "$WHEELS" | sed -E 's/\.tar\.xz$//' | sed -E 's/-[0-9].*//' | tr '[:upper:]-' '[:lower:]_' | sort | uniq -d)
if [ -n "$dupes" ]; then
	echo "gpu_prepare: several versions of: $dupes" >&2
	exit 1
fi

size_kib=$(du -sk "$WHEELS" | cut -f1)
echo "downloaded $(ls "$WHEELS" | wc -l) packages, $((size_kib / 1024)) MiB, into $WHEELS/:"
ls "$WHEELS" | sed 's/^/  /'
# what travels besides: tracked files and untracked ones git does not ignore
tree_kib=$(( ($( { git ls-files -z; git ls-files -z --others --exclude-standard; } |
	xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s }') + 1023) / 1024 ))
total_mib=$(( (size_kib + tree_kib) / 1024 ))
echo "working tree $((tree_kib / 1024)) MiB + $WHEELS $((size_kib / 1024)) MiB = $total_mib MiB (limit $LIMIT_MIB)"
if [ "$total_mib" -ge "$LIMIT_MIB" ]; then
	echo "gpu_prepare: the call would carry $total_mib MiB, over $LIMIT_MIB MiB" >&2
	exit 1
fi
if ! git check-ignore -q "$WHEELS/x.whl"; then
	echo "gpu_prepare: $WHEELS/ is not git-ignored; add /.whl/ to .gitignore" >&2
	exit 1
fi

cat <<'EOF'

The device call (the `run` tool; docs/gpu.md says what each row means):
  carry:     [".whl"]
  timeout_s: 560
  command:
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && python3 -c "import glob, tarfile; [tarfile.open(f).extractall('/tmp/site') for f in glob.glob('.whl/*.tar.xz')]" && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 bench/gpu_check.py 2>&1 | tee $OUT/gpu_check.log
EOF
