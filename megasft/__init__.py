"""megasft: Megatron-style tensor x pipeline x data parallel supervised fine-tuning."""

__version__ = "0.1.0"
