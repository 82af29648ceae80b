"""Sharded resumable checkpoints and Hugging Face weight mapping."""
