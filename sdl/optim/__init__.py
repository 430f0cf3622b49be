"""Optimisers: optax transforms and schedules built from config."""
from sdl.optim import kfac
from sdl.optim.schedules import make_optimizer, make_schedule

__all__ = ["kfac", "make_optimizer", "make_schedule"]
