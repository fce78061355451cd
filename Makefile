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
.PHONY: setup venv s3s-fs test demo build cli soak bench gpu-bundle mutants clean-venv

setup: venv s3s-fs

venv: $(READY)

s3s-fs: $(S3S_FS)

$(READY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-cache-dir torch==$(TORCH_VERSION) safetensors numpy
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

# Mutation testing, not part of `make test` (about two hours on 2 cores for
# every file; needs `cargo install cargo-mutants@27.1.0 --locked`):
# cargo-mutants changes the code of the files below one mutation at a time,
# in its own copy of a copy of the working tree (target/mutants-work; the
# tree itself is never changed), and runs the library's unit tests against
# each mutant. The archive format's survivors are tried again with
# tests/mutants.rs (damaged archives, also read by Python) as well
# (`--iterate`: only what the unit tests missed). Prints each file's score,
# (caught + timeout) / viable mutants; the survivors are listed in
# target/mutants/*/mutants.out/missed.txt. `make mutants
# MUTANTS_FILES=src/policy/retention.rs` tries one file (or several) in minutes.
MUTANTS_LIB := src/policy/retention.rs src/actors/order.rs src/policy/state.rs src/policy/schedule.rs src/folder/durable.rs src/folder/disk.rs
MUTANTS_FORMAT := src/archive/zipread.rs src/archive/format.rs src/archive/writer.rs src/archive/reader.rs src/archive/safetensors.rs
MUTANTS_FILES ?= $(MUTANTS_LIB) $(MUTANTS_FORMAT)
MUTANTS_WORK := target/mutants-work
MUTANTS_OUT := target/mutants
# Target selection goes to every cargo command (--cargo-arg), so that the
# build of each mutant compiles only the test binaries that run.
MUTANTS_RUN = cargo mutants --dir $(MUTANTS_WORK) --jobs 1 --cargo-arg=--target-dir=$(CURDIR)/$(MUTANTS_OUT)/target --cargo-arg=--lib
define MUTANTS_SCORE
import collections, json, os, sys
for out in sys.argv[1:]:
    counts = collections.defaultdict(collections.Counter)
    if not os.path.exists(out + "/mutants.out/outcomes.json"):
        continue
    for o in json.load(open(out + "/mutants.out/outcomes.json"))["outcomes"]:
        if isinstance(o["scenario"], dict):
            counts[o["scenario"]["Mutant"]["file"]][o["summary"]] += 1
    # Caught (or unviable) in the earlier stage (`--iterate` lists both).
    earlier, unviable = out + "/mutants.out/previously_caught.txt", out + "/mutants.out.old/unviable.txt"
    was_unviable = set(open(unviable).read().split("\n")) if os.path.exists(unviable) else set()
    for line in open(earlier) if os.path.exists(earlier) else []:
        if line.strip():
            counts[line.split(":", 1)[0]]["Unviable" if line.strip() in was_unviable else "CaughtMutant"] += 1
    for file, c in sorted(counts.items()):
        killed, viable = c["CaughtMutant"] + c["Timeout"], c["CaughtMutant"] + c["Timeout"] + c["MissedMutant"]
        print(f"{file}: {killed}/{viable} = {100 * killed / max(viable, 1):.1f}% ({c['MissedMutant']} missed, {c['Unviable']} unviable)")
endef
export MUTANTS_SCORE
mutants: venv
	@command -v cargo-mutants >/dev/null || { echo "cargo-mutants missing: cargo install cargo-mutants@27.1.0 --locked"; exit 1; }
	rm -rf $(MUTANTS_WORK) $(MUTANTS_OUT)/lib $(MUTANTS_OUT)/format
	mkdir -p $(MUTANTS_WORK) $(MUTANTS_OUT)
	git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(MUTANTS_WORK)
	ln -s $(CURDIR)/$(VENV) $(MUTANTS_WORK)/$(VENV)
	export LIBTORCH="$${LIBTORCH:-$(CURDIR)/$(VENV)/torch}"; status=0; \
	lib="$(filter $(MUTANTS_LIB),$(MUTANTS_FILES))"; format="$(filter $(MUTANTS_FORMAT),$(MUTANTS_FILES))"; \
	if [ -n "$$lib" ]; then \
	    $(MUTANTS_RUN) --output $(MUTANTS_OUT)/lib $$(printf -- '--file %s ' $$lib) || case $$? in 2|3) ;; *) status=1 ;; esac; \
	fi; \
	if [ -n "$$format" ]; then \
	    $(MUTANTS_RUN) --output $(MUTANTS_OUT)/format $$(printf -- '--file %s ' $$format) || case $$? in 2|3) ;; *) status=1 ;; esac; \
	    $(MUTANTS_RUN) --output $(MUTANTS_OUT)/format $$(printf -- '--file %s ' $$format) --iterate --cargo-arg=--test=mutants \
	        || case $$? in 2|3) ;; *) status=1 ;; esac; \
	fi; \
	$(PY) -c "$$MUTANTS_SCORE" $(MUTANTS_OUT)/lib $(MUTANTS_OUT)/format; exit $$status

clean-venv:
	rm -rf $(VENV)
