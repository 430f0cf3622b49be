"""sdl: scalable deep learning in JAX.

Subpackages: `sdl.parallel` (meshes, shardings, spatial partitioning), `sdl.models` (pure
Flax modules), `sdl.data` (synthetic universes, datasets), `sdl.optim` (optax transforms),
`sdl.train` (the jitted step, checkpoints, metrics), `sdl.bench` (timing, memory).
"""
__version__ = "0.1.0"
