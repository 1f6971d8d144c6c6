"""Costs of the node-shared expert optimizer (kt_sft/integration/expert_optimizer.py), in one process:

1. one AdamW step over a rank's range of N values: ExpertAdamW with torch's single-tensor formula and
   with torch's fused kernel, beside torch.optim.AdamW (fused and not) on 2N values (what one rank steps
   when the Trainer's optimizer holds the whole expert LoRA);
2. the experts' forward + backward with the expert LoRA read from a /dev/shm mapping vs private memory
   (LoraCPUExperts, alternating per iteration).

    .venv/bin/python scripts/bench_expert_optimizer.py [--values 51118080] [--tokens 512] [--out FILE.json]

Medians; prints and writes JSON. Threads: 1 (one rank of two on a 2-core node).
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from torch import nn

from kt_sft import environment
from kt_sft.integration import expert_optimizer as eo


def median_time(fn, repeats):
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def optimizer_steps(n: int, repeats: int) -> dict:
    flat = torch.randn(n) * 0.01
    p = nn.Parameter(flat.view(-1))
    p.grad = torch.randn(n) * 1e-3
    out = {}
    for fused in (False, True):
        groups = [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "fused": fused}]
        ours = eo.ExpertAdamW([eo.Slot("p", p, 0, 0)], flat, 0, n, groups)
        out[f"expert_adamw_{'fused' if fused else 'single_tensor'}_s"] = median_time(ours.step, repeats)
        q = nn.Parameter(torch.randn(2 * n) * 0.01)
        q.grad = torch.randn(2 * n) * 1e-3
        ref = torch.optim.AdamW([q], lr=1e-4, **({"fused": True} if fused else {"foreach": False}))
        out[f"torch_adamw_{'fused' if fused else 'single_tensor'}_2n_s"] = median_time(ref.step, repeats)
        del q, ref
    return out


def shared_vs_private(tokens: int, repeats: int) -> dict:
    from kt_sft.integration.peft_lora import LoraCPUExperts

    torch.manual_seed(0)
    e, h, inter, k, r = 64, 2048, 1408, 6, 64  # DeepSeek-V2-Lite's expert layer, r=64
    ex = LoraCPUExperts.from_tensors((torch.randn(e, 2 * inter, h) * 0.02).bfloat16(),
                                     (torch.randn(e, h, inter) * 0.02).bfloat16(), format="int8", compute_mode="f32")
    ex.update_layer("default", r, 2 * r, 0.0, "gaussian", False)
    params = list(ex.parameters())
    n = sum(p.numel() for p in params)
    private = torch.cat([p.detach().reshape(-1) for p in params])
    fd, path = tempfile.mkstemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.ftruncate(fd, n * 4)
    os.close(fd)
    shared = torch.from_file(path, shared=True, size=n, dtype=torch.float32)
    os.unlink(path)
    shared.copy_(private)

    def point(buf):
        off = 0
        for p in params:
            p.data = buf[off:off + p.numel()].view_as(p)
            off += p.numel()

    idx = torch.argsort(torch.rand(tokens, e), dim=1)[:, :k].contiguous()
    w, x, dy = torch.rand(tokens, k), torch.randn(tokens, h), torch.randn(tokens, h)

    def run():
        ex.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        ex(xx, idx, w).backward(dy)

    times = {"private": [], "shared": []}
    for i in range(repeats + 1):
        order = (("private", private), ("shared", shared)) if i % 2 == 0 else (("shared", shared), ("private", private))
        for name, buf in order:
            point(buf)
            t = time.perf_counter()
            run()
            if i:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"tokens": tokens, "lora_rank": r, "private_s": med["private"], "shared_s": med["shared"],
            "shared_over_private": med["shared"] / med["private"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--values", type=int, default=51_118_080, help="values one rank steps (default: half the "
                    "mini DeepSeek-V2-Lite's expert LoRA at r=64)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {"values": args.values, "steps": optimizer_steps(args.values, args.repeats),
              "kernels": shared_vs_private(args.tokens, args.repeats), "machine": environment.machine(),
              "git": environment.git_state()}
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
