"""The generic training loop: jitted step, checkpoints, metrics, progress, plots."""
