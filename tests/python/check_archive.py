"""Read a modelio archive with only zipfile + safetensors and compare it with
tensors rebuilt here by the same formula the Rust test used."""
import json
import sys
import zipfile

import torch
from safetensors.torch import load

DTYPES = {
    "f32": torch.float32, "f64": torch.float64, "f16": torch.float16, "bf16": torch.bfloat16,
    "i64": torch.int64, "i32": torch.int32, "u8": torch.uint8, "bool": torch.bool,
}


def expected(dtype, shape):
    n = 1
    for d in shape:
        n *= d
    values = torch.arange(n, dtype=torch.float64) * 0.37 - 2.5
    if dtype == torch.bool:
        return (values > 0).reshape(shape)
    if dtype == torch.uint8:
        return values.abs().to(dtype).reshape(shape)
    return values.to(dtype).reshape(shape)


def main(path, shapes_json):
    shapes = json.loads(shapes_json)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None, "zip CRC failed"
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED, info.filename
        manifest = json.loads(z.read("manifest.json"))
        tensors = load(z.read("model.safetensors"))
        with open(path, "rb") as f:
            raw = f.read()
        info = z.getinfo("model.safetensors")
        # Local header: 30 bytes + name + extra; data must start 64-aligned.
        name_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
        extra_len = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
        data_start = info.header_offset + 30 + name_len + extra_len
        assert data_start % 64 == 0, data_start
    assert sorted(tensors) == sorted(shapes), (sorted(tensors), sorted(shapes))
    assert sorted(t["name"] for t in manifest["model"]) == sorted(shapes)
    for name, shape in shapes.items():
        dtype = DTYPES[name.split(".")[0]]
        want = expected(dtype, shape)
        got = tensors[name]
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        assert list(got.shape) == list(want.shape), (name, got.shape, want.shape)
        assert torch.equal(got, want), (name, got, want)
    print(f"ok: {len(shapes)} tensors match")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
