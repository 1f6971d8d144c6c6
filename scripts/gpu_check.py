"""GPU path check, prepared to run once on a lent GPU machine (`device` tool): scripts/gpu_check.sh.

1. CPUExperts with CUDA inputs: results equal the CPU-input run (same C code, data through pinned
   host buffers), gradients land on the input's device; time of CUDA-input vs CPU-input calls.
2. Expert LoRA with CUDA inputs: LoRA tensors stay on the CPU, results equal the CPU-input run.
3. One training step of a tiny DeepSeek-V2 (random weights, built in-process) with the non-expert
   part on CUDA and the experts on the CPU: loss and gradients vs the all-CPU run; wall-time split
   between the experts (host) and the rest.
Writes $OUT/gpu_check.json (or ./gpu_check.json). Needs torch with CUDA, transformers, the built
kt_sft extension; not llamafactory.
"""

import json
import os
import statistics
import time

import torch

import kt_sft
from kt_sft import CPUExperts

DEVICE = os.environ.get("KT_GPU_CHECK_DEVICE", "cuda")  # "cpu" only to dry-run this script without a GPU


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats=5):
    out, times = None, []
    for _ in range(repeats + 1):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times[1:])


def check_experts(report):
    torch.manual_seed(0)
    e, h, inter, t, k = 64, 2048, 1408, 512, 6
    ex = CPUExperts.from_tensors(torch.randn(e, 2 * inter, h) * 0.02, torch.randn(e, h, inter) * 0.02,
                                 format="int8", compute_mode="f32")
    idx = torch.argsort(torch.rand(t, e), dim=1)[:, :k].contiguous()
    w = torch.rand(t, k)
    x = torch.randn(t, h)
    dy = torch.randn(t, h)

    def run(device):
        xx = x.to(device).requires_grad_(True)
        ww = w.to(device).requires_grad_(True)
        y = ex(xx, idx.to(device), ww)
        y.backward(dy.to(device))
        return y.detach(), xx.grad, ww.grad

    (y_c, dx_c, dw_c), t_cpu = timed(lambda: run("cpu"))
    (y_g, dx_g, dw_g), t_gpu = timed(lambda: run(DEVICE))
    report["experts"] = {
        "devices": [str(y_g.device), str(dx_g.device), str(dw_g.device)],
        "equal_to_cpu_run": bool(torch.equal(y_g.cpu(), y_c) and torch.equal(dx_g.cpu(), dx_c)
                                 and torch.equal(dw_g.cpu(), dw_c)),
        "fwd_bwd_ms_cpu_inputs": round(t_cpu * 1e3, 2),
        "fwd_bwd_ms_cuda_inputs": round(t_gpu * 1e3, 2),
        "transfer_overhead_ms": round((t_gpu - t_cpu) * 1e3, 2),
    }


def check_expert_lora(report):
    """LoraCPUExperts inside a module moved to CUDA: the LoRA tensors stay fp32 on the CPU, CUDA inputs
    give the CPU-input results, gradients land on the CPU parameters."""
    from kt_sft.integration.peft_lora import LoraCPUExperts

    torch.manual_seed(0)
    e, h, inter, t, k = 16, 512, 256, 256, 4
    ex = LoraCPUExperts.from_tensors(torch.randn(e, 2 * inter, h) * 0.02, torch.randn(e, h, inter) * 0.02,
                                     format="bf16", compute_mode="f32")
    ex.update_layer("default", 8, 16, 0.0, False, False)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(std=0.02)
    holder = torch.nn.Sequential(torch.nn.Linear(h, h), ex).to(DEVICE)
    idx = torch.argsort(torch.rand(t, e), dim=1)[:, :k].contiguous()
    w, x, dy = torch.rand(t, k), torch.randn(t, h), torch.randn(t, h)

    def run(device):
        ex.zero_grad(set_to_none=True)
        xx = x.to(device).requires_grad_(True)
        y = ex(xx, idx.to(device), w.to(device))
        y.backward(dy.to(device))
        return y.detach().cpu(), xx.grad.cpu(), [p.grad.clone() for p in ex.parameters()]

    y_c, dx_c, g_c = run("cpu")
    y_g, dx_g, g_g = run(DEVICE)
    report["expert_lora"] = {
        "lora_params_on": sorted({str(p.device) for p in ex.parameters()}),
        "linear_on": str(holder[0].weight.device),
        "equal_to_cpu_run": bool(torch.equal(y_g, y_c) and torch.equal(dx_g, dx_c)
                                 and all(torch.equal(a, b) for a, b in zip(g_g, g_c))),
    }


def check_training_step(report):
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    cfg = DeepseekV2Config(hidden_size=256, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=512,
                           moe_intermediate_size=128, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4,
                           topk_method="greedy", q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32,
                           qk_rope_head_dim=16, v_head_dim=32, num_attention_heads=4, num_key_value_heads=4,
                           vocab_size=1000, norm_topk_prob=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    for layer in model.model.layers[1:]:
        old = layer.mlp.experts
        layer.mlp.experts = CPUExperts.from_tensors(old.gate_up_proj.detach(), old.down_proj.detach(),
                                                    format="bf16", compute_mode="f32")
    ids = torch.randint(0, 1000, (4, 128))
    torch.backends.cuda.matmul.allow_tf32 = False

    def step(device):
        model.zero_grad(set_to_none=True)
        model.to(device)
        out = model(ids.to(device), labels=ids.to(device))
        out.loss.backward()
        return out.loss.item(), {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}

    loss_c, grads_c = step("cpu")
    expert_time = []
    for layer in model.model.layers[1:]:  # time spent in the CPU experts (host side, forward)
        mod = layer.mlp.experts
        mod.register_forward_pre_hook(lambda m, a: expert_time.append(-time.perf_counter()))
        mod.register_forward_hook(lambda m, a, o: expert_time.append(time.perf_counter()))
    (loss_g, grads_g), t_step = timed(lambda: step(DEVICE), repeats=3)
    worst = max(float((grads_g[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in grads_c.items())
    experts_fwd = sum(expert_time) / 4  # 4 timed steps (1 warm-up + 3)
    report["training_step"] = {
        "loss_cpu": loss_c, "loss_cuda": loss_g, "worst_grad_rel_err": worst,
        "experts_weights_on": str(model.model.layers[1].mlp.experts.packed.gate_up.device),
        "router_on": str(model.model.layers[1].mlp.gate.weight.device),
        "step_ms": round(t_step * 1e3, 2), "experts_forward_ms_per_step": round(experts_fwd * 1e3, 2),
    }


def main():
    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": DEVICE,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "engine": kt_sft.engine_info()}
    for check in (check_experts, check_expert_lora, check_training_step):
        try:
            check(report)
        except Exception as exc:  # report and go on: one run of this script is all the GPU time there is
            report[check.__name__] = f"error: {type(exc).__name__}: {exc}"
    text = json.dumps(report, indent=2, default=str)
    print(text)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
