"""dynalign: Dynamic Alignment with GRPO on Ray, vLLM and DeepSpeed."""

from dynalign.log import setup_logging as _setup_logging

__version__ = "0.1.0"

_setup_logging()  # "dynalign: warning: ..." on the console from any entry point; the CLI sets the level
