"""The Python peers of the bench (examples/bench, `make bench`), on a state of the same size and mix:
torch.save + fsync, safetensors.torch.save_file + fsync, and
torch.distributed.checkpoint.async_save (single process, gloo).
Prints and writes their figures as JSON (milliseconds, medians)."""
import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch


def synthetic_state(size_bytes, device):
    """About size_bytes of model + AdamW state, the same mix as the bench."""
    model_bytes = size_bytes // 3
    pattern = [(4096, 4096), (4096,), (1024, 4096), (1024,), (1024, 1024), (1024,)]
    params, total, i = {}, 0, 0
    while total < model_bytes:
        shape = pattern[i % len(pattern)]
        n = 1
        for d in shape:
            n *= d
        if total + 4 * n > model_bytes:
            shape = (max((model_bytes - total) // 4, 1),)
            n = shape[0]
        params[f"layer{i // 6}.p{i % 6}"] = torch.nn.Parameter(torch.empty(shape, device=device).uniform_(-0.1, 0.1))
        total += 4 * n
        i += 1
    opt = torch.optim.AdamW(params.values(), lr=1e-4)
    loss = sum((p * p).sum() for p in params.values())
    loss.backward()
    opt.step()
    return {"model": {k: v.detach() for k, v in params.items()}, "optimizer": opt.state_dict()}


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(fn, reps):
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", default="target/bench-dir")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="target/bench-peers.json")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    work = os.path.abspath(tempfile.mkdtemp(prefix="peers-", dir=args.dir))
    device = torch.device(args.device)
    state = synthetic_state(args.size_mib << 20, device)
    out = {}
    try:
        path = os.path.join(work, "torch.pt")

        def torch_save():
            with open(path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        out["torch_save_ms"] = timed(torch_save, args.reps)

        try:
            from safetensors.torch import save_file
        except ImportError:
            save_file = None
            print("safetensors is not installed: its figure is skipped")

        flat = dict(state["model"])
        for pid, s in state["optimizer"]["state"].items():
            for k, v in s.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    flat[f"opt.{pid}.{k}"] = v
        st_path = os.path.join(work, "model.safetensors")

        def st_save():
            save_file(flat, st_path)
            fsync_path(st_path)

        if save_file is not None:
            out["safetensors_save_ms"] = timed(st_save, args.reps)

        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        dist.init_process_group("gloo", init_method=f"file://{os.path.join(work, 'pg')}", rank=0, world_size=1)
        stalls, totals = [], []
        for i in range(args.reps):
            start = time.perf_counter()
            fut = dcp.async_save(state, checkpoint_id=os.path.join(work, f"dcp{i}"))
            stalls.append((time.perf_counter() - start) * 1e3)
            fut.result()
            totals.append((time.perf_counter() - start) * 1e3)
        out["dcp_async_stall_ms"] = statistics.median(stalls)
        out["dcp_async_total_ms"] = statistics.median(totals)
        dist.destroy_process_group()

        if device.type == "cuda":
            src = torch.cat([t.flatten() for t in flat.values()])
            dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            gbps = []
            for _ in range(args.reps):
                torch.cuda.synchronize()
                start = time.perf_counter()
                dst.copy_(src, non_blocking=True)
                torch.cuda.synchronize()
                gbps.append(src.numel() * src.element_size() / (time.perf_counter() - start) / 1e9)
            out["pinned_d2h_gbps"] = statistics.median(gbps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    for k, v in out.items():
        print(f"{k:<24} {v:10.3f}")


if __name__ == "__main__":
    main()
