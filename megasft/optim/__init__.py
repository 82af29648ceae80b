"""Gradient buffers, ZeRO-1 distributed AdamW, LR schedule, global grad norm."""
