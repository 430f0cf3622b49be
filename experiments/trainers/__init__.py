"""Experiment trainers, one per family, each readable top to bottom and forkable: setup,
init, step, loop, eval, on the generic parts in `sdl` (big_vision's train.py is the model).
The entry points (`experiments/<name>.py`) are thin absl wrappers around them."""
