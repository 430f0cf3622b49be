"""sdl.train.loop: what it launches on the devices between steps."""
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sdl.parallel import make_mesh
from sdl.train import loop


def test_metric_window_is_summed_on_the_host(monkeypatch):
  """The logged means sum the steps' metrics in numpy after one transfer. A `+` on the
  (replicated, multi-device) metric arrays launches a computation on every device while the
  next step is in flight, which wedged the 4-device demo on XLA:CPU (`loop._host_sums`)."""
  mesh = make_mesh((2, 4), ("data", "spatial"))
  replicated = NamedSharding(mesh, PartitionSpec())
  rng = np.random.default_rng(0)
  host = [{"loss": np.float32(rng.standard_normal()),
           "mae_param": rng.standard_normal(4).astype(np.float32)} for _ in range(7)]
  window = [jax.device_put({k: jnp.asarray(v) for k, v in m.items()}, replicated)
            for m in host]
  assert len(window[0]["loss"].sharding.device_set) == 8

  def device_add(*args, **kwargs):
    raise AssertionError("a computation on the devices between steps")
  array_type = type(window[0]["loss"])
  monkeypatch.setattr(array_type, "__add__", device_add)
  monkeypatch.setattr(array_type, "__radd__", device_add)

  sums = loop._host_sums(window)
  assert math.isclose(float(sums["loss"]), math.fsum(float(m["loss"]) for m in host),
                      rel_tol=1e-12)
  for i in range(4):
    expected = math.fsum(float(m["mae_param"][i]) for m in host)
    assert math.isclose(float(sums["mae_param"][i]), expected, rel_tol=1e-12)
  record = loop.scalars(sums, len(host))
  assert set(record) == {"loss", "mae_param_0", "mae_param_1", "mae_param_2", "mae_param_3"}
  assert math.isclose(record["loss"], float(sums["loss"]) / 7, rel_tol=1e-15)
