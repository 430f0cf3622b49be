"""Device meshes built from config.

A mesh is written in a config as data::

    config.mesh.shape = (2, 2)              # devices along each axis
    config.mesh.axes = ("data", "spatial")  # any distinct names; config.mesh.rules map
                                            # logical axes onto them (sdl.parallel.sharding)

One entry may be -1: that axis takes the devices the others leave, e.g. (-1, 2).

Axes are `AxisType.Auto` (GSPMD): the model step is partitioned by XLA from the input and
parameter shardings plus a few constraints. `jax.make_mesh` defaults to Explicit axes, under
which a sharded contraction raises `ShardingTypeError`, so the type is set deliberately.
"""
from collections.abc import Sequence

import jax
import numpy as np

from sdl.errors import ConfigError




def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replace one -1 entry by the devices left over (like maxtext's `-1` parallelism)."""
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1:
    raise ConfigError(f"mesh.shape {shape}: at most one axis may be -1 (the rest)")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if known < 1 or num_devices % known:
      raise ConfigError(f"mesh.shape {shape}: the other axes ({known} devices) do not divide "
                        f"the {num_devices} available devices; change mesh.shape, or on CPU set "
                        f"mesh.cpu_devices to a multiple of {known} to emulate more devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  return shape


def check_mesh_config(shape: Sequence[int], axes: Sequence[str], num_devices: int) -> None:
  """Validate `mesh.shape`/`mesh.axes` against the device count, before anything compiles."""
  shape, axes = resolve_mesh_shape(shape, num_devices), tuple(axes)
  if len(shape) != len(axes):
    raise ConfigError(
        f"mesh.shape {shape} has {len(shape)} entries but mesh.axes {axes} has {len(axes)}; "
        "give one size per axis name")
  if len(set(axes)) != len(axes) or not all(isinstance(a, str) and a for a in axes):
    raise ConfigError(f"mesh.axes {axes}: give distinct, non-empty names, one per axis")
  if any(int(s) < 1 for s in shape):
    raise ConfigError(f"mesh.shape {shape}: every axis needs at least 1 device")
  size = int(np.prod(shape))
  if size != num_devices:
    hint = (f"set mesh.shape to a factorisation of {num_devices} (e.g. ({num_devices}, 1)), "
            f"or on CPU set mesh.cpu_devices={size} (or XLA_FLAGS="
            f"--xla_force_host_platform_device_count={size}) to emulate {size} devices")
    raise ConfigError(
        f"mesh.shape {shape} needs {size} devices but {num_devices} are available; {hint}")


def make_mesh(shape: Sequence[int], axes: Sequence[str],
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh with Auto axes over `devices` (default: all devices), validated first."""
  devices = list(jax.devices() if devices is None else devices)
  check_mesh_config(shape, axes, len(devices))
  grid = np.asarray(devices, dtype=object).reshape(resolve_mesh_shape(shape, len(devices)))
  auto = (jax.sharding.AxisType.Auto,) * len(axes)
  return jax.sharding.Mesh(grid, tuple(axes), axis_types=auto)
