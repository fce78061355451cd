"""Read every `*.mio` file of a folder the way docs/FORMAT.md says Python
reads an archive (zipfile + safetensors, nothing of modelio's) and print one
JSON line per file: whether Python accepts it and, when it does, what it read.

Accepting means: zipfile opens it, testzip() finds no bad entry, manifest.json
is JSON, and safetensors loads model.safetensors (and optimizer.safetensors
when the zip holds it). What it read is given as CRC-32s so the Rust side
can compare it with the original tensors, optimizer JSON and state.
"""
import json
import os
import sys
import zipfile
import zlib

import torch
from safetensors.torch import load

TENSOR_ENTRIES = ("model.safetensors", "optimizer.safetensors")


def tensor_crc(t):
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return zlib.crc32(raw)


def read(path):
    out = {}
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
        if bad is not None:
            raise ValueError(f"testzip: bad entry {bad}")
        names = z.namelist()
        manifest = json.loads(z.read("manifest.json"))
        out["iterations"] = manifest.get("iterations")
        optimizer = manifest.get("optimizer")
        out["optimizer_kind"] = optimizer.get("kind") if isinstance(optimizer, dict) else None
        for entry in TENSOR_ENTRIES:
            if entry in names:
                tensors = load(z.read(entry))
                out[entry] = {
                    name: [str(t.dtype).replace("torch.", ""), list(t.shape), tensor_crc(t)]
                    for name, t in tensors.items()
                }
        for entry in ("optimizer.json", "state.json"):
            if entry in names:
                out[entry] = zlib.crc32(z.read(entry))
    return out


def main(folder):
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".mio"):
            continue
        try:
            result = {"file": name, "ok": True, "read": read(os.path.join(folder, name))}
        except Exception as e:  # any refusal, whatever its type, is a refusal
            result = {"file": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
