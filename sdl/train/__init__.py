"""The generic trainer, for any model family: train state and the one jitted step
(`step`), the loop (`loop.fit`), evaluation, checkpoints, metrics, progress, plots and
losses. It knows no model family; trainers in `experiments/trainers/` bring theirs."""
