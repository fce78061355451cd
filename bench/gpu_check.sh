#!/usr/bin/env bash
# The GPU checks, run on a machine that has a CUDA GPU and Python with torch
# 2.11.0 but no Rust, from binaries built elsewhere with `make gpu-bundle`
# (which copies them, this script and peers.py into .dev/gpu/):
#
#   .dev/gpu/gpu_check.sh            # SIZE_MIB=3072 REPS=3 by default
#
# 1. tests/gpu.rs: the archive holds the values at the call although training
#    changes them right after `save` returns (it prints the stall).
# 2. the bench (examples/bench) with `--device cuda`, and the Python peers on
#    the same state; its table checks the stall (under 1 ms per GiB).
# Logs and JSON go to $OUT (or .dev/gpu/out).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
torch_lib=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
out=${OUT:-$here/out}
work=${WORK:-$here/work}
size=${SIZE_MIB:-3072}
reps=${REPS:-3}
mkdir -p "$out" "$work"
nvidia-smi -L || true
python3 -c 'import torch; print("torch", torch.__version__, "cuda available:", torch.cuda.is_available())'

echo "== tests/gpu.rs"
"$here/gpu-test" --nocapture 2>&1 | tee "$out/gpu-test.log"

echo "== bench, ${size} MiB on cuda"
PYTHONUNBUFFERED=1 python3 "$here/peers.py" --size-mib "$size" --device cuda --reps "$reps" --dir "$work" --json "$out/bench-peers.json" 2>&1 | tee "$out/peers.log"
"$here/bench" --size-mib "$size" --device cuda --reps "$reps" --dir "$work" --peers "$out/bench-peers.json" --json "$out/bench.json" 2>&1 | tee "$out/bench.log"
rm -rf "$work"
