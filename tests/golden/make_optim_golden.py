"""Golden values for modelio's optimizers, from torch.optim with the repo's torch.

Run from the repo root: .venv/bin/python tests/golden/make_optim_golden.py
It writes tests/golden/optim.json: the initial parameter, the gradient of
each step (a step's loss is sum(param * grad)), and the parameter after each
step for every optimizer configuration.
"""
import json
import math

import torch

STEPS = 4
SHAPE = (3, 4)


def values(seed, n):
    return [round(math.sin(seed * 7.3 + i * 1.7) * 2.0, 6) for i in range(n)]


def run(kind, hyper, init, grads):
    p = torch.tensor(init, dtype=torch.float32).reshape(SHAPE).requires_grad_(True)
    opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]([p], **hyper)
    out = []
    for g in grads:
        opt.zero_grad()
        (p * torch.tensor(g, dtype=torch.float32).reshape(SHAPE)).sum().backward()
        opt.step()
        out.append(p.detach().flatten().tolist())
    return out


def main():
    n = SHAPE[0] * SHAPE[1]
    init = values(1, n)
    grads = [values(10 + k, n) for k in range(STEPS)]
    configs = [
        ("sgd", {"lr": 0.1}),
        ("sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
        ("sgd", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.02}),
        ("adam", {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}),
        ("adam", {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
        ("adamw", {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}),
        ("adamw", {"lr": 0.03, "betas": (0.85, 0.995), "eps": 1e-7, "weight_decay": 0.2}),
    ]
    cases = [{"kind": k, "hyper": h, "after_each_step": run(k, h, init, grads)} for k, h in configs]
    golden = {"torch": torch.__version__, "shape": SHAPE, "init": init, "grads": grads, "cases": cases}
    with open("tests/golden/optim.json", "w") as f:
        json.dump(golden, f, indent=1)


if __name__ == "__main__":
    main()
