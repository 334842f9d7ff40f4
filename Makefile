# magistream developer commands. `make install` then `make test` (or `make run`).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PYTHON ?= python3.11
# On a CUDA host: make install TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?=
RUN_DIR ?= .cache/run

.PHONY: install system-deps proto run test lint fmt bench clean

install: system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	@if [ -n "$(TORCH_INDEX)" ]; then \
		$(PIP) install -q torch==2.13.0 --index-url $(TORCH_INDEX); fi
	$(PIP) install -q -r requirements.txt 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, transformers, safetensors, av, grpc, sentencepiece, ftfy, bs4"
	$(PIP) install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true

# Debian tools the tests and demos use (ffprobe from ffmpeg, promtool from prometheus).
system-deps:
	@if command -v ffprobe >/dev/null && command -v promtool >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends ffmpeg prometheus >/dev/null; \
	else echo "system-deps: install ffmpeg and prometheus (promtool) with your package manager"; fi

proto:
	PYTHON=$(PY) bash proto/generate.sh

# The main job on the embedded default model. Until the gRPC service lands this writes the
# tiny model, checks it, and runs one DiT forward over a full window.
run:
	$(PY) -m model write-random --preset tiny --out $(RUN_DIR)/tiny --seed 0
	$(PY) -m model check $(RUN_DIR)/tiny
	$(PY) bench/model_forward.py --quick

test:
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench:
	$(PY) bench/model_forward.py

clean:
	rm -rf .cache .pytest_cache
