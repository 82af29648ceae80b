"""Tensor and sequence parallelism: collectives, sharded layers, vocab-parallel loss."""
