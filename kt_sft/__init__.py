"""kt_sft: fine-tune Mixture-of-Experts models with the routed experts quantized in CPU memory."""

from kt_sft.engine import engine_info, set_kernel_path, set_num_threads
from kt_sft.engine.experts import CPUExperts
from kt_sft.engine.formats import ComputeMode, Format

__version__ = "0.1.0"
__all__ = ["CPUExperts", "ComputeMode", "Format", "engine_info", "set_kernel_path", "set_num_threads"]
