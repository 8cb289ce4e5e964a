"""Training: the DeepSpeed engine, the one loop every recipe stage runs, checkpoints, optimisers."""
