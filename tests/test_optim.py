"""Schedules and optimisers built from config, against closed forms."""
import math

import ml_collections
import numpy as np
import optax
import pytest

from sdl.optim import make_optimizer, make_schedule


def optim(**kw):
  base = dict(name="sgd", lr=0.1, momentum=0.9, warmup_steps=10, decay="cosine",
              weight_decay=0.0, clip_norm=0.0)
  return ml_collections.ConfigDict({**base, **kw})


def test_warmup_then_cosine():
  schedule = make_schedule(optim(), total_steps=110)
  assert float(schedule(0)) == pytest.approx(0.0)
  assert float(schedule(5)) == pytest.approx(0.05)
  for step in (10, 35, 60, 109):
    expected = 0.1 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-8)


def test_sgd_momentum_matches_hand_update():
  tx = make_optimizer(optim(warmup_steps=0, decay="constant"), 10).tx
  params = {"w": np.array([1.0, -2.0])}
  state = tx.init(params)
  grads = [{"w": np.array([0.5, 0.25])}, {"w": np.array([-1.0, 2.0])}]
  velocity, w = np.zeros(2), params["w"].copy()
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    velocity = 0.9 * velocity + g["w"]
    w = w - 0.1 * velocity
  np.testing.assert_allclose(params["w"], w, rtol=1e-6)


def test_unknown_names_are_rejected():
  with pytest.raises(ValueError, match="optim.name='lamb'"):
    make_optimizer(optim(name="lamb"), 10)
  with pytest.raises(ValueError, match="optim.decay='step'"):
    make_schedule(optim(decay="step"), 10)
