#!/usr/bin/env bash
# Regenerates the Python code of proto/video_generation.proto (`make proto` runs this).
# Usage: proto/generate.sh [OUT_DIR]   (default: the repo root, i.e. in place)
# `-I.` with the file at proto/... makes the grpc module import `from proto import
# video_generation_pb2`. tests/proto/test_proto.py regenerates into a temp dir and checks
# the committed files are byte-identical.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${1:-.}"
mkdir -p "$OUT"
"$PYTHON" -m grpc_tools.protoc -I. \
    --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
    proto/video_generation.proto
