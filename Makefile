# Set-up from nothing, in two parts: `venv`, a repo-local virtualenv with the
# PyPI torch wheel that provides libtorch (and safetensors + numpy for the
# interop tests) and the `.venv/torch` link that `.cargo/config.toml` points
# LIBTORCH at (all that the demo needs); and `s3s-fs`, the S3-protocol server
# that the remote tier's tests and the bench run against on loopback.
# `setup` is both.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready
TORCH_VERSION := 2.11.0
# s3s-fs: an S3 server storing objects as files (a bucket is a folder) that
# checks request signatures; installed once into the git-ignored .tools/.
TOOLS := .tools
S3S_FS := $(TOOLS)/bin/s3s-fs
S3S_FS_VERSION := 0.14.1
.PHONY: setup venv s3s-fs test demo build cli soak bench gpu-bundle clean-venv

setup: venv s3s-fs

venv: $(READY)

s3s-fs: $(S3S_FS)

$(READY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION) safetensors numpy
	ln -sfn $$($(PY) -c 'import torch, os; print(os.path.relpath(os.path.dirname(torch.__file__), "$(VENV)"))') $(VENV)/torch
	touch $(READY)

# Built from source (a few minutes, once); skipped while the binary exists.
$(S3S_FS):
	cargo install s3s-fs@$(S3S_FS_VERSION) --features binary --locked --root $(TOOLS)

build: venv
	cargo build --release --all-targets

# The `modelio` command, a package of its own (cli/) built without libtorch:
# target/cli/release/modelio (`cargo modelio ...` runs it; `cargo install
# --path cli` puts it on PATH).
cli:
	cargo build --release --manifest-path cli/Cargo.toml --target-dir target/cli

# Every test: unit, integration, property, Python interop, CLI (the tests
# build the `modelio` command from cli/ themselves, in debug) and the
# downstream crate (built into target/, reusing the tests' dependencies).
test: setup
	cargo test

# The main job: the demo trainer (saves, snapshots, resumes when run again).
demo: venv
	cargo run --release --example train -- $(ARGS)

# Benchmarks side by side (SIZE_MIB=1024 by default, DEVICE=cpu|cuda): the
# Python peers, then modelio's own figures; one table, and target/bench.json.
SIZE_MIB ?= 1024
DEVICE ?= cpu
bench: setup
	cargo build --release --example bench
	PYTHONUNBUFFERED=1 $(PY) bench/peers.py --size-mib $(SIZE_MIB) --device $(DEVICE) --json target/bench-peers.json
	target/release/examples/bench --size-mib $(SIZE_MIB) --device $(DEVICE) --peers target/bench-peers.json --json target/bench.json

# Everything the GPU checks need on a machine without Rust, in .dev/gpu/:
# copy that folder there and run .dev/gpu/gpu_check.sh.
gpu-bundle: venv
	cargo build --release --example bench
	mkdir -p .dev/gpu
	cp target/release/examples/bench bench/peers.py bench/gpu_check.sh .dev/gpu/
	cp "$$(cargo test --release --test gpu --no-run --message-format=json | $(PY) -c 'import json, sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"] == "gpu"][-1])')" .dev/gpu/gpu-test

# 200 crash trials (SIGKILL at random moments); prints the count.
soak: venv
	cargo build --examples
	MODELIO_CRASH_TRIALS=200 cargo test --test crash -- --nocapture

clean-venv:
	rm -rf $(VENV)
