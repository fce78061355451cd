"""Read a modelio archive with only zipfile + safetensors and compare it with
tensors rebuilt here by the same formula the Rust test used. Also checks what
docs/FORMAT.md says a reader checks beyond zipfile: the manifest's own
checksum, and the CRC-32C of every tensor and of state.json, from the
document alone."""
import json
import re
import sys
import zipfile

import torch
from safetensors.torch import load

DTYPES = {
    "f32": torch.float32, "f64": torch.float64, "f16": torch.float16, "bf16": torch.bfloat16,
    "i64": torch.int64, "i32": torch.int32, "u8": torch.uint8, "bool": torch.bool,
}


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


CRC32C_TABLE = _crc32c_table()


def crc32c(data):
    """CRC-32C (Castagnoli), as the manifest's checksums use."""
    c = 0xFFFFFFFF
    for b in data:
        c = (c >> 8) ^ CRC32C_TABLE[(c ^ b) & 0xFF]
    return c ^ 0xFFFFFFFF


def check_manifest_checksum(raw, manifest):
    """The checksum is the last member; it covers the file with its digits replaced by 0."""
    m = re.search(rb'"checksum"\s*:\s*(\d+)\s*}\s*$', raw)
    assert m, "checksum is not the manifest's last field"
    assert int(m.group(1)) == manifest["checksum"]
    zeroed = raw[:m.start(1)] + b"0" + raw[m.end(1):]
    assert crc32c(zeroed) == manifest["checksum"], "manifest checksum failed"


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
        raw_manifest = z.read("manifest.json")
        manifest = json.loads(raw_manifest)
        assert manifest["format"] == "modelio" and manifest["format_version"] == 2, manifest["format_version"]
        check_manifest_checksum(raw_manifest, manifest)
        assert crc32c(z.read("state.json")) == manifest["state_crc32c"]
        model_bytes = z.read("model.safetensors")
        tensors = load(model_bytes)
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
    # Each tensor's CRC-32C, over its bytes in the safetensors entry.
    header_len = int.from_bytes(model_bytes[:8], "little")
    header = json.loads(model_bytes[8:8 + header_len])
    data = model_bytes[8 + header_len:]
    for meta in manifest["model"]:
        begin, end = header[meta["name"]]["data_offsets"]
        assert crc32c(data[begin:end]) == meta["crc32c"], meta["name"]
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
