# magistream developer commands. `make install` then `make test` (or `make run`).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PYTHON ?= python3.11
# On a CUDA host: make install TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?=
RUN_DIR ?= .cache/run

.PHONY: install system-deps proto run test lint fmt bench gpu-check clean image image-test image-deps

install: system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	@if [ -n "$(TORCH_INDEX)" ]; then \
		$(PIP) install -q torch==2.13.0 --index-url $(TORCH_INDEX); fi
	$(PIP) install -q -r requirements.txt 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, transformers, safetensors, av, grpc, sentencepiece, ftfy, bs4, websockets, playwright"
	$(PIP) install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true

# Debian tools the tests and demos use (ffprobe from ffmpeg, promtool from prometheus,
# nginx for the session-routing test, chromium for the playground's browser test).
system-deps:
	@if command -v ffprobe >/dev/null && command -v promtool >/dev/null && \
		{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null && \
		test -x /usr/bin/chromium; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends ffmpeg prometheus nginx chromium >/dev/null; \
	else echo "system-deps: install ffmpeg, prometheus (promtool), nginx and chromium with your package manager"; fi

proto:
	PYTHON=$(PY) bash proto/generate.sh

# The main job on the embedded default model (the trained `toy` world): start magi-server, draw
# a red ball as the start image, stream a 4-chunk i2v video whose prompt turns the ball at
# chunk 2 through magi-client, stop the server.
# `make run PLAYGROUND_PORT=8080` also serves the playground page (docs/realtime.md): its address is
# printed, and the server keeps running after the demo until Ctrl-C.
RUN_PORT ?= 50051
PLAYGROUND_PORT ?=
run:
	@mkdir -p $(RUN_DIR)
	@$(PY) -m server --host 127.0.0.1 --port $(RUN_PORT) --metrics-port 0 \
		$(if $(PLAYGROUND_PORT),--http-port $(PLAYGROUND_PORT)) \
		--cache $(RUN_DIR)/models > $(RUN_DIR)/server.log 2>&1 & pid=$$!; \
	trap 'kill $$pid 2>/dev/null; wait $$pid' EXIT; \
	for i in $$(seq 120); do grep -q "^security: " $(RUN_DIR)/server.log && break; sleep 1; done; \
	grep "^playground: " $(RUN_DIR)/server.log || true; \
	$(PY) -m toyworld still --colour red --shape ball --out $(RUN_DIR)/start.png && \
	$(PY) -m client generate --server 127.0.0.1:$(RUN_PORT) --retries 20 \
		--image $(RUN_DIR)/start.png --prompt "a red ball moves to the right" \
		--prompt-at "2:a red ball moves to the left" --chunks 4 --seed 0 \
		--out $(RUN_DIR)/demo.mp4 && echo "demo video: $(RUN_DIR)/demo.mp4" && \
	if [ -n "$(PLAYGROUND_PORT)" ]; then \
		echo "$$(grep '^playground: ' $(RUN_DIR)/server.log) stays up until Ctrl-C"; \
		wait $$pid; fi

# Two pytest workers: in-process tests run torch on one thread (tests/conftest.py), so two of
# them fill the two cores CI has; the suite is 5 min serial, 3.5 min so.
test:
	$(PY) -m pytest -q -n 2 --dist loadgroup

# The CPU container image, built on this machine with no Docker engine and no registry: a
# Debian base from debootstrap (kept once made), `buildah bud` of the Dockerfile, then the smoke
# test (docs/deploy.md, "Building here"). Needs root. `make image-test` builds only when the
# image is missing, then runs the smoke test (.ci/run runs it after the tests).
IMAGE ?= localhost/magistream:cpu
image: image-deps
	IMAGE=$(IMAGE) PY=$(PY) bash deploy/image/build.sh
	IMAGE=$(IMAGE) $(PY) deploy/image/smoke.py

image-test: image-deps
	@buildah --storage-driver vfs inspect --type image $(IMAGE) >/dev/null 2>&1 || \
		IMAGE=$(IMAGE) PY=$(PY) bash deploy/image/build.sh
	IMAGE=$(IMAGE) $(PY) deploy/image/smoke.py

image-deps:
	@if command -v buildah >/dev/null && command -v debootstrap >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends buildah debootstrap >/dev/null; \
	else echo "image-deps: install buildah and debootstrap (as root)"; exit 1; fi

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench:
	$(PY) bench/model_forward.py
	$(PY) bench/batching.py

# The GPU check (issue 22, docs/gpu.md): correctness on the device, the 4.5B step, real time and
# batching, in under 8 minutes on one H100 or H200. GPU_CHECK_FLAGS="--quick --device cpu" runs
# every part at tiny sizes here.
GPU_CHECK_FLAGS ?=
gpu-check:
	$(PY) bench/gpu_check.py $(GPU_CHECK_FLAGS)

clean:
	rm -rf .cache .pytest_cache
