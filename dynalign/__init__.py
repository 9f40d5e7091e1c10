"""dynalign: Dynamic Alignment with GRPO on Ray, vLLM and DeepSpeed."""

__version__ = "0.1.0"
