"""The bridge to transformers, PEFT and LLaMA-Factory: a checkpoint becomes a converted directory
that upstream `from_pretrained` loads with its routed experts in the engine.

    models/     one small adapter per MoE family (its on-disk expert names, its transformers class)
    settings    the `kt_sft` block of a converted config.json
    convert     HF checkpoint -> converted directory (expert pack + the rest + modeling file)
    loading     the class the converted directory names; swaps each experts module for CPUExperts
    peft_lora   expert LoRA as a PEFT LoRA layer, and the adapter-config rewrite
    export      converted directory + adapter -> a merged plain HF checkpoint
"""
