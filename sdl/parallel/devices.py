"""The one place that knows about virtual CPU devices.

Tests and laptop demos emulate a multi-device machine with XLA's host platform: N CPU
"devices" in one process. That must be decided before the backend starts, so every entry
point calls `ensure_cpu_devices` first thing. On GPU/TPU hosts the setting only touches
the (unused) CPU backend.
"""
import jax


def ensure_cpu_devices(count: int | None) -> None:
  """Ask for at least `count` CPU devices; no-op for None/1 or when already started.

  Raises RuntimeError if the backend already started with fewer CPU devices, because
  then the request can no longer be honoured in this process.
  """
  if not count or count <= 1:
    return
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # backend already initialised: check what we got
    pass
  have = len(jax.devices("cpu"))
  if have < count:
    raise RuntimeError(
        f"needed {count} CPU devices but the JAX backend already started with {have}; "
        f"call sdl.parallel.ensure_cpu_devices({count}) before any JAX computation, or "
        f"set XLA_FLAGS=--xla_force_host_platform_device_count={count}")
