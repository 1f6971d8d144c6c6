"""Benchmarks; they may use every other part of kt_sft. Each run writes auditable JSON.

    bench_kernels   `kt-sft bench kernels`: the C kernels against torch baselines
    compare         `kt-sft bench compare`: kt_sft vs plain HF vs DeepSpeed ZeRO-Offload, one LoRA SFT job
    compare_worker  one compare mode in its own process (`python -m kt_sft.bench.compare_worker SPEC`)
    compare_plots   plots from a compare run's JSON
    shaped_models   random-weight checkpoints with a real model's tensor names and shapes
"""
