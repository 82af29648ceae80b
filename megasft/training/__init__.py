"""Train loop, evaluation, metrics."""
