"""Kept at this path for converted directories: the `modeling_kt_sft.py` that `kt-sft convert` writes
(before and after the package got its wings) runs `from kt_sft.loading import kt_causal_lm_class`.
The code lives in kt_sft.integration.loading."""

from kt_sft.integration.loading import kt_causal_lm_class

__all__ = ["kt_causal_lm_class"]
