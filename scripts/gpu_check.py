"""GPU path check, prepared to run once on a lent GPU machine (`device` tool): scripts/gpu_check.sh.

1. CPUExperts with CUDA inputs: results equal the CPU-input run (same C code, data through pinned
   host buffers), gradients land on the input's device; time of CUDA-input vs CPU-input calls.
2. Expert LoRA with CUDA inputs: LoRA tensors stay on the CPU, results equal the CPU-input run.
3. One training step of a tiny DeepSeek-V2 (random weights, built in-process) with the non-expert
   part on CUDA and the experts on the CPU: loss and gradients vs the all-CPU run; wall-time split
   between the experts (host) and the rest.
4. Issue #14 item 8, the route several ranks take, on one GPU: a 1-rank process group over NCCL, a
   tiny converted Qwen3-MoE with PEFT LoRA on attention and experts moved to CUDA, wrapped in DDP (which
   must accept it: the expert LoRA stays on the CPU and is ignored by DDP) and trained 4 steps with
   kt_sft's node-shared expert optimizer taking the expert LoRA out of torch's AdamW; then the same under
   DeepSpeed ZeRO-2 (when deepspeed is installed; its start-up broadcast must skip the CPU tensors).
   Losses and expert LoRA vs the same steps all on the CPU.
Writes $OUT/gpu_check.json (or ./gpu_check.json). Needs torch with CUDA, transformers, the built
kt_sft extension (and peft + accelerate for 4, deepspeed optional); not llamafactory.
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


def _tiny_kt_model(work):
    """A converted tiny Qwen3-MoE with LoRA (r=4) on attention and the experts, fp32."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kt_sft.fixtures import build_fixtures
    from kt_sft.integration.convert import convert

    if not os.path.isdir(os.path.join(work, "kt")):
        build_fixtures(os.path.join(work, "fx"), archs=["qwen3_moe"], log=None)
        convert(os.path.join(work, "fx", "models", "qwen3_moe"), os.path.join(work, "kt"), "bf16", progress=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(work, "kt"), trust_remote_code=True, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "experts"],
                     init_lora_weights="gaussian")
    return get_peft_model(model, cfg)


def _train_steps(device, engine, work, steps=4):
    """`steps` AdamW steps of the tiny model on `device` through DDP or DeepSpeed ZeRO-2 (1 rank)."""
    from types import SimpleNamespace

    from kt_sft.integration import expert_optimizer
    from kt_sft.integration.distributed import expert_lora_sync_of

    model = _tiny_kt_model(work).to(device)
    # no clipping: under DeepSpeed the expert LoRA is clipped by its own norm, under DDP by the model's
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(fp16=False, max_grad_norm=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    if engine == "zero2":
        import deepspeed
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
                  "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
        keep = HfDeepSpeedConfig(config)  # noqa: F841 - registers the config: kt_sft sees DeepSpeed is on
        ours = expert_optimizer.attach(trainer, opt)
        wrapped, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    else:
        ours = expert_optimizer.attach(trainer, opt)
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0] if device == "cuda" else None)
    sync = expert_lora_sync_of(model)
    start = {n: p.detach().clone() for n, p in sync._params.values()}
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 1000, (2, 64), generator=g).to(device)
        loss = wrapped(input_ids=ids, labels=ids).loss
        if engine == "zero2":
            wrapped.backward(loss)
            wrapped.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    lora = {n: p.detach().clone() for n, p in sync._params.values()}
    moved = max(float((lora[n] - t).norm()) for n, t in start.items())  # the steps did train it
    return {"losses": losses, "lora": lora, "expert_optimizer": ours is not None, "expert_lora_moved": moved,
            "lora_devices": sorted({str(p.device) for p in lora.values()}),
            "all_reduces": sync.all_reduces}


def check_ranks_route(report):
    """Item 4 of the module docstring. One process group per engine: NCCL (gloo on a CPU dry run)."""
    import tempfile

    import torch.distributed as dist

    work = os.path.join(tempfile.gettempdir(), "kt_gpu_check_ranks")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29611", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    out = {}
    for engine in ("ddp", "zero2"):
        if engine == "zero2":
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                out[engine] = "skipped: deepspeed is not installed"
                continue
        try:
            dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=0, world_size=1)
            got = _train_steps(DEVICE, engine, work)
        except Exception as exc:  # noqa: BLE001 - recorded in the report
            out[engine] = f"error: {type(exc).__name__}: {exc}"
            continue
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        out[engine] = got
    # the reference: the same steps, all on the CPU, under DDP over gloo
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ref = _train_steps("cpu", "ddp", work)
    finally:
        dist.destroy_process_group()
    for engine, got in out.items():
        if not isinstance(got, dict):
            continue
        worst = max(float((got["lora"][n].cpu() - t).norm() / t.norm().clamp_min(1e-12)) for n, t in ref["lora"].items())
        out[engine] = {"losses": got["losses"], "losses_cpu_ddp": ref["losses"],
                       "worst_loss_gap": max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])),
                       "worst_expert_lora_rel_diff": worst, "expert_lora_on": got["lora_devices"],
                       "kt_sft_expert_optimizer": got["expert_optimizer"],
                       "expert_lora_moved_by": got["expert_lora_moved"]}
    report["ranks_route"] = out


def main():
    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": DEVICE,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "engine": kt_sft.engine_info()}
    for check in (check_experts, check_expert_lora, check_training_step, check_ranks_route):
        try:
            check(report)
        except Exception as exc:  # noqa: BLE001 - report and go on: one run of this script is all the GPU time there is
            report[check.__name__] = f"error: {type(exc).__name__}: {exc}"
    text = json.dumps(report, indent=2, default=str)
    print(text)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
