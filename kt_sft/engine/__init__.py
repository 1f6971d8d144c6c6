"""The engine: routed experts quantized in host memory and run by the C kernels. Knows torch and the
native module only (no transformers model classes, PEFT or LLaMA-Factory); the layers, bottom up:

    _native          the compiled cffi module, or a stand-in that explains a missing build
    formats          quant formats and compute modes, mirrored from native/kt_sft.h
    runtime          threads and kernel path (ISA)
    reference        pure-torch twin of every native op (tests compare against it)
    functional       validate -> allocate -> call C -> tensors; the kernel path's self-check
    recompute_cache  forward intermediates kept for the checkpointed recompute
    autograd         torch.autograd.Function over functional; cpu_experts()
    pack_file        the expert pack on disk: one file, memory-mapped per layer
    experts          CPUExperts, the nn.Module
    expert_lora      expert LoRA in PEFT's tensor layout: the kernels' view of it and its ΔW

`kt_sft.engine` was a module holding the runtime settings; they stay importable from here.
"""

from kt_sft.engine.runtime import (
    KERNEL_PATHS,
    available_kernel_paths,
    engine_info,
    kernel_path,
    set_kernel_path,
    set_num_threads,
)

__all__ = ["KERNEL_PATHS", "available_kernel_paths", "engine_info", "kernel_path", "set_kernel_path",
           "set_num_threads"]
