"""The generic evaluation: every full batch of a `BatchSource`, in order, averaged."""
import jax
import numpy as np

from sdl.data.source import BatchSource
from sdl.parallel import ConfigError


def evaluate(eval_step, state, source: BatchSource, batch_size: int) -> dict:
  """Means of `eval_step(params, model_state, batch)`'s metrics over the `len(source) //
  batch_size` full batches of `source` (the remainder is left out, the same every time)."""
  n = len(source) // batch_size
  if n == 0:
    raise ConfigError(f"{len(source)} evaluation samples are fewer than train.batch_size="
                      f"{batch_size}; add evaluation data or lower train.batch_size")
  sums = None
  for b in range(n):
    batch = source.batch(np.arange(b * batch_size, (b + 1) * batch_size))
    out = jax.device_get(eval_step(state.params, state.model_state, batch))
    sums = out if sums is None else jax.tree.map(np.add, sums, out)
  return scalars(sums, n)


def scalars(metrics: dict, count: int = 1) -> dict:
  """Metrics (or per-batch sums of them, divided by `count`) as floats for JSON; a vector
  metric `mae_param` becomes `mae_param_0`, `mae_param_1`, ..."""
  out = {}
  for key, total in metrics.items():
    value = np.asarray(total, np.float64) / count
    if value.ndim:
      out.update({f"{key}_{i}": float(v) for i, v in enumerate(value.ravel())})
    else:
      out[key] = float(value)
  return out
