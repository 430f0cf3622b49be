"""sdl: scalable deep learning in JAX.

Subpackages: `sdl.parallel` (meshes, shardings, spatial partitioning), `sdl.models` (pure
Flax modules), `sdl.data` (synthetic universes, datasets), `sdl.optim` (optax transforms),
`sdl.train` (the generic trainer: state, step, loop, checkpoints, metrics), `sdl.bench`
(timing, FLOP counts, the layer suite).

Importing sdl changes nothing in the process. The CPU-process settings that sdl's entry
points make (allocator, BLAS threads, XLA flags) are one explicit call,
`sdl.process.configure()` (see `sdl/process.py`).
"""
__version__ = "0.1.0"
