"""sdl's default XLA flags: added only for the jaxlib versions measured, never over the
user's own setting, and accepted by the installed jaxlib (XLA aborts on unknown flags)."""
import os
import subprocess
import sys

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
