"""Kept at this path for converted directories: the `modeling_kt_sft.py` that `kt-sft convert` writes
(before and after the package got its wings) runs `from kt_sft.loading import kt_causal_lm_class`.
The code lives in kt_sft.integration.loading.

Importing this module is the moment a converted model enters a training run (LLaMA-Factory loads it
with trust_remote_code), so it also installs the guard that refuses to resume from a checkpoint an
interrupted save left half-written (kt_sft.integration.checkpoints) and the Trainer hooks that give the
expert LoRA its node-shared optimizer (kt_sft.integration.expert_optimizer)."""

from kt_sft.integration import expert_optimizer
from kt_sft.integration.checkpoints import install_resume_guard
from kt_sft.integration.loading import kt_causal_lm_class

install_resume_guard()
expert_optimizer.install()

__all__ = ["kt_causal_lm_class"]
