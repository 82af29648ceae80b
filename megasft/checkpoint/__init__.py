"""Sharded, verified, resumable checkpoints and the HF <-> megasft checkpoint converter."""
