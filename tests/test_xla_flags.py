"""sdl's default XLA flags: added only for the jaxlib versions measured, never over the
user's own setting, and accepted by the installed jaxlib (XLA aborts on unknown flags)."""
import os
import subprocess
import sys

import pytest

from sdl import xla_flags

YNN = "--xla_cpu_experimental_ynn_fusion_type"
SCHEDULER = ("--xla_cpu_enable_concurrency_optimized_scheduler=false "
             "--xla_cpu_collective_call_terminate_timeout_seconds=1800")


def test_defaults_only_for_measured_jaxlib_versions():
  assert xla_flags.with_defaults("", (0, 10)) == f"{YNN}=individual_dot {SCHEDULER}"
  assert xla_flags.with_defaults("", (0, 12)) == f"{YNN}=individual_dot {SCHEDULER}"
  assert xla_flags.with_defaults("", (0, 9)) == ""
  assert xla_flags.with_defaults("", (0, 13)) == ""
  assert xla_flags.with_defaults("--a=1", None) == "--a=1"


def test_the_users_setting_wins():
  for own in (f"{YNN}=", f"{YNN}=individual_dot,individual_convolution", f"--x=1 {YNN} --y"):
    assert xla_flags.with_defaults(own, (0, 10)) == f"{own} {SCHEDULER}"
  own = "--xla_cpu_collective_call_terminate_timeout_seconds=60"
  assert xla_flags.with_defaults(own, (0, 10)) == (
      f"{own} {YNN}=individual_dot --xla_cpu_enable_concurrency_optimized_scheduler=false")
  # another flag that merely starts with the same name is not the same flag
  longer = f"{YNN}_other=1"
  assert xla_flags.with_defaults(longer, (0, 10)) == f"{longer} {YNN}=individual_dot {SCHEDULER}"


def test_configure_sets_flags_the_installed_jaxlib_accepts():
  code = ("import os; from sdl import process; process.configure(); "
          "import jax, jax.numpy as jnp; "
          "x = jnp.ones((1, 8, 8, 2)); w = jnp.ones((3, 3, 2, 4)); "
          "y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', "
          "dimension_numbers=('NHWC', 'HWIO', 'NHWC')); "
          "print(float(y[0, 4, 4, 0]), os.environ['XLA_FLAGS'])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "XLA_FLAGS": ""}, timeout=120, check=True)
  value, flags = out.stdout.split(maxsplit=1)
  assert float(value) == 18.0  # 3 x 3 taps x 2 channels of ones
  expected = xla_flags.default_flags(xla_flags._jaxlib_version())
  assert all(f"--{name}={v}" in flags for name, v in expected.items())


def test_fast_compile_is_asked_for_by_name_and_adds_only_the_optimisation_level():
  assert not xla_flags.fast_compile_requested({})
  assert not xla_flags.fast_compile_requested({"SDL_FAST_COMPILE": "0"})
  assert xla_flags.fast_compile_requested({"SDL_FAST_COMPILE": "1"})
  with pytest.raises(ValueError, match="SDL_FAST_COMPILE='yes': set it to 1"):
    xla_flags.fast_compile_requested({"SDL_FAST_COMPILE": "yes"})
  assert xla_flags.with_defaults("", (0, 9), fast_compile=True) == (
      "--xla_backend_optimization_level=1")
  own = "--xla_backend_optimization_level=3"
  assert xla_flags.with_defaults(own, (0, 9), fast_compile=True) == own


def test_fast_compile_level_computes_a_conv_step_like_the_default_level():
  """-O1 (the suite's level, `SDL_FAST_COMPILE`) against XLA's default -O2, compiled from
  the same lowering of a small 3D CNN's init, loss and gradients (3³ kernels: the loop
  nests the two levels compile differently): loss and every gradient within 1e-6, so that
  what the suite checks at -O1 holds for the code users run."""
  import flax.linen as nn  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(8, (3, 3, 3))(x))
      x = nn.avg_pool(nn.relu(nn.Conv(16, (3, 3, 3))(x)), (2, 2, 2), (2, 2, 2))
      return nn.Dense(4)(x.reshape(x.shape[0], -1))

  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 8, 4)).astype(np.float32)
  y = rng.uniform(-1, 1, size=(2, 4)).astype(np.float32)
  model = Net()

  def loss_and_grads(key):
    params = model.init(key, x[:1])
    return jax.value_and_grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)

  lowered = jax.jit(loss_and_grads).lower(jax.random.key(0))
  (loss_o2, grads_o2), (loss_o1, grads_o1) = (
      lowered.compile({"xla_backend_optimization_level": level})(jax.random.key(0))
      for level in (2, 1))
  assert float(loss_o2) > 0
  assert abs(float(loss_o1) - float(loss_o2)) <= 1e-6 * abs(float(loss_o2))
  for (path, g1), g2 in zip(jax.tree_util.tree_leaves_with_path(grads_o1),
                            jax.tree.leaves(grads_o2)):
    assert float(jnp.linalg.norm(g2)) > 0, jax.tree_util.keystr(path)
    assert float(jnp.linalg.norm(g1 - g2)) <= 1e-6 * float(jnp.linalg.norm(g2)), \
        jax.tree_util.keystr(path)
