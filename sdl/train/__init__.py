"""The generic trainer, for any model family: train state and the one jitted step
(`step`), the loop (`loop.fit`), evaluation, checkpoints, metrics, progress, plots,
losses and ranking metrics (`ranking`: Kendall tau-b, top-k%). It knows no model family;
trainers in `experiments/trainers/` bring theirs."""
