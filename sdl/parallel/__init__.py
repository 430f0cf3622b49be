"""Meshes, shardings and spatial partitioning."""
from sdl.parallel.devices import ensure_cpu_devices
from sdl.parallel.mesh import ConfigError, make_mesh
from sdl.parallel.sharding import Partitioner, VOLUME_AXES

__all__ = ["ConfigError", "Partitioner", "VOLUME_AXES", "ensure_cpu_devices", "make_mesh"]
