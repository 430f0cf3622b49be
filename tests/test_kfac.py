"""K-FAC against an independent numpy computation, closed forms, counts and one device."""
import contextlib
import dataclasses
import itertools
import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sdl.models.conv import Conv3D
from sdl.optim import kfac
from sdl.train.step import Model, TrainState, make_train_step


class Net(nn.Module):
  """conv (or nothing) -> tanh -> flatten -> dense -> tanh -> dense."""
  conv: nn.Module | None

  @nn.compact
  def __call__(self, x):
    if self.conv is not None:
      x = jnp.tanh(self.conv(x))
    x = x.reshape(x.shape[0], -1)
    x = jnp.tanh(nn.Dense(5)(x))
    return nn.Dense(3, use_bias=False)(x)


# Batches are larger than every factor's dimension: with fewer examples than inputs, A is
# rank-deficient and fp32 rounding outside its range, amplified by 1/λ, dominates the error.
NETS = {  # name: (first layer, input shape)
    "dense": (None, (64, 7)),
    "conv1d_strided_same": (nn.Conv(4, (3,), strides=2, padding="SAME"), (64, 9, 2)),
    "conv2d_asymmetric": (nn.Conv(3, (3, 2), strides=(2, 1), padding=((1, 0), (0, 1))),
                          (64, 6, 5, 2)),
    "conv3d_valid_no_bias": (nn.Conv(2, (2, 3, 2), padding="VALID", use_bias=False),
                             (64, 3, 4, 3, 2)),
    "conv3d_sdl_strided": (Conv3D(3, (3, 3, 3), strides=(2, 1, 2)), (64, 3, 3, 3, 2)),
}


def kfac_step(model, layers, loss_fn, tx, *, fisher="empirical", likelihood=None, mesh=None,
              axis_names=(), grad_dtype=None, transposable=contextlib.nullcontext):
  """The project's one train step with K-FAC's gradients function."""
  grads = kfac.gradients(layers, fisher=fisher, likelihood=likelihood, axis_names=axis_names,
                         transposable=transposable)
  return make_train_step(Model(model), loss_fn, tx, gradients=grads, mesh=mesh,
                         batch_axes=axis_names, grad_dtype=grad_dtype)


def mse(outputs, batch):
  loss = 0.5 * jnp.mean(jnp.sum(jnp.square(outputs - batch["y"]), axis=-1))
  return loss, {}


def state_for(model, x, tx):
  params = model.init(jax.random.key(1), x)["params"]
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                    jax.random.key_data(jax.random.key(2)))


def batch_for(shape, seed=0, n_out=3):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.normal(size=shape), jnp.float32),
          "y": jnp.asarray(rng.normal(size=(shape[0], n_out)), jnp.float32)}


# ---- the independent reference -------------------------------------------------------


def np_patches(x, kernel, strides, padding):
  """[N*T, taps*C] by explicit loops over examples and output positions."""
  k = kernel.shape[:-2]
  x = np.pad(x, ((0, 0), *padding, (0, 0)))
  out = [(x.shape[1 + i] - k[i]) // strides[i] + 1 for i in range(len(k))]
  rows = []
  for n in range(x.shape[0]):
    for pos in itertools.product(*(range(o) for o in out)):
      window = x[(n, *(slice(p * s, p * s + kk) for p, s, kk in zip(pos, strides, k)))]
      rows.append(window.reshape(-1))  # row-major taps, channels last
  return np.asarray(rows)


def reference_update(model_conv, params, batch, damping, pi_damping=True, relative=False,
                     channels=False):
  """Forward written with lax directly (not Flax), output gradients by perturbations, and
  the K-FAC algebra in float64 numpy. `channels`: the conv layer's input factor is
  I_taps ⊗ A_c (A_c: the mean of the patch factor's per-tap diagonal blocks), with the
  bias on its own entry 1."""
  conv_params = params.get("conv")
  names = (["conv"] if conv_params is not None else []) + ["Dense_0", "Dense_1"]

  def geometry(conv, x_shape):
    k = conv.kernel_size
    nd = len(k)
    s = (1,) * nd if conv.strides is None else conv.strides
    s = (s,) * nd if isinstance(s, int) else tuple(s)
    pad = conv.padding
    if isinstance(pad, str):
      pad = lax.padtype_to_pads(x_shape[1:-1], k, s, pad)
    return s, [tuple(p) for p in pad]

  def forward(eps):
    acts, x = [], batch["x"]
    if conv_params is not None:
      s, pad = geometry(model_conv, x.shape)
      acts.append(x)
      nd = x.ndim - 2
      spatial = "DHW"[-nd:] if nd <= 3 else None
      dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
      y = lax.conv_general_dilated(x, conv_params["kernel"], s, pad, dimension_numbers=dn,
                                   precision=lax.Precision.HIGHEST)
      if "bias" in conv_params:
        y = y + conv_params["bias"]
      x = jnp.tanh(y + eps[0])
    x = x.reshape(x.shape[0], -1)
    acts.append(x)
    h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"] + eps[-2])
    acts.append(h)
    out = h @ params["Dense_1"]["kernel"] + eps[-1]
    return mse(out, batch)[0], acts

  shapes = jax.eval_shape(lambda: forward([0.0] * 3)[1])
  n = batch["x"].shape[0]
  eps0 = []
  if conv_params is not None:
    s, pad = geometry(model_conv, batch["x"].shape)
    out_spatial = [(batch["x"].shape[1 + i] + lo + hi - k) // st + 1 for i, ((lo, hi), k, st)
                   in enumerate(zip(pad, model_conv.kernel_size, s))]
    eps0.append(jnp.zeros((n, *out_spatial, model_conv.features)))
  eps0 += [jnp.zeros((n, 5)), jnp.zeros((n, 3))]
  del shapes
  (_, acts), d_eps = jax.value_and_grad(forward, has_aux=True)(eps0)
  acts = [np.asarray(a, np.float64) for a in acts]
  d_eps = [np.asarray(d, np.float64) for d in d_eps]

  updates = {}
  for name, a_in, g_mean in zip(names, acts, d_eps):
    p = {k: np.asarray(v, np.float64) for k, v in params[name].items()}
    if name == "conv":
      s, pad = geometry(model_conv, a_in.shape)
      a = np_patches(a_in, p["kernel"], s, pad)
    else:
      a = a_in
    g = g_mean.reshape(-1, g_mean.shape[-1])  # gradients of the batch-mean loss
    if "bias" in p:
      a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    grad = a.T @ g  # ∇[W; b], computed independently of JAX's autodiff
    big_a = a.T @ a / a.shape[0]
    c_in = p["kernel"].shape[-2]
    taps = p["kernel"].size // p["kernel"].shape[-1] // c_in
    if name == "conv" and channels:
      blocks = [big_a[t * c_in:(t + 1) * c_in, t * c_in:(t + 1) * c_in] for t in range(taps)]
      big_a = np.eye(c_in + ("bias" in p))
      big_a[:c_in, :c_in] = np.mean(blocks, axis=0)
    big_g = (g * n).T @ (g * n) / n
    if pi_damping:
      pi = math.sqrt((np.trace(big_a) / big_a.shape[0]) / (np.trace(big_g) / big_g.shape[0]))
    else:
      pi = 1.0
    la, lg = math.sqrt(damping) * pi, math.sqrt(damping) / pi
    if relative:  # λ_A λ_G = λ (tr A / dim A)(tr G / dim G)
      scale = math.sqrt(np.trace(big_a) / len(big_a) * np.trace(big_g) / len(big_g))
      la, lg = la * scale, lg * scale
    a_inv = np.linalg.inv(big_a + la * np.eye(len(big_a)))
    g_inv = np.linalg.inv(big_g + lg * np.eye(len(big_g)))
    if name == "conv" and channels:  # the same A_c⁻¹ on every tap's rows
      a_inv = np.kron(np.eye(taps), a_inv[:c_in, :c_in]) if "bias" not in p else (
          np.block([[np.kron(np.eye(taps), a_inv[:c_in, :c_in]), np.zeros((taps * c_in, 1))],
                    [np.zeros((1, taps * c_in)), a_inv[c_in:, c_in:]]]))
    u = a_inv @ grad @ g_inv
    k_rows = p["kernel"].size // p["kernel"].shape[-1]
    updates[name] = {"kernel": u[:k_rows].reshape(p["kernel"].shape)}
    if "bias" in p:
      updates[name]["bias"] = u[-1]
  return updates


def rename_conv(params):
  """Flax names the first layer after its class; the reference calls it `conv`."""
  out = dict(params)
  for key in list(out):
    if key.startswith(("Conv_", "Conv3D_")):
      out["conv"] = out.pop(key)
  return out


def one_update(model, layers, tx, batch, **step_kw):
  state = state_for(model, batch["x"], tx)
  step = jax.jit(kfac_step(model, layers, mse, tx, **step_kw))
  new, _ = step(state, batch)
  return state.params, jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new.params,
                                    state.params)


@pytest.mark.parametrize("pi_damping", [True, False])
@pytest.mark.parametrize("inversion", kfac.INVERSIONS)
@pytest.mark.parametrize("net", list(NETS))
def test_update_matches_numpy_reference(net, inversion, pi_damping):
  conv, shape = NETS[net]
  model, batch = Net(conv), batch_for(shape)
  layers = kfac.find_layers(model, batch["x"])
  assert len(layers) == (3 if conv is not None else 2)
  tx = kfac.kfac(layers, damping=0.05, inversion=inversion, pi_damping=pi_damping)
  params, update = one_update(model, layers, tx, batch)
  expected = reference_update(conv, rename_conv(params), batch, 0.05, pi_damping)
  got = rename_conv(update)
  for name, leaves in expected.items():
    for leaf, want in leaves.items():
      have = got[name][leaf]
      err = np.linalg.norm(have - want) / np.linalg.norm(want)
      assert err < 1e-5, (net, name, leaf, err)


@pytest.mark.parametrize("pi_damping", [True, False])
@pytest.mark.parametrize("net", ["dense", "conv3d_sdl_strided"])
def test_relative_damping_matches_numpy_reference(net, pi_damping):
  conv, shape = NETS[net]
  model, batch = Net(conv), batch_for(shape)
  layers = kfac.find_layers(model, batch["x"])
  tx = kfac.kfac(layers, damping=0.05, inversion="cholesky", pi_damping=pi_damping,
                 relative_damping=True)
  params, update = one_update(model, layers, tx, batch)
  expected = reference_update(conv, rename_conv(params), batch, 0.05, pi_damping, True)
  got = rename_conv(update)
  for name, leaves in expected.items():
    for leaf, want in leaves.items():
      err = np.linalg.norm(got[name][leaf] - want) / np.linalg.norm(want)
      assert err < 1e-5, (net, name, leaf, err)


@pytest.mark.parametrize("net", ["conv2d_asymmetric", "conv3d_valid_no_bias",
                                 "conv3d_sdl_strided"])
def test_channel_factor_matches_numpy_reference(net):
  conv, shape = NETS[net]
  model, batch = Net(conv), batch_for(shape)
  found = kfac.find_layers(model, batch["x"])
  conv_name, = (n for n, s in found.items() if s.kind == "conv")
  spec = found[conv_name]
  # select_layers: a bound below the patch factor drops the conv or, with
  # wide_conv="channels", keeps it with the channel factor (c_in + bias wide).
  assert kfac.select_layers({conv_name: spec}, spec.in_dim - 1) == {}
  wide = kfac.select_layers({conv_name: spec}, spec.in_dim - 1, wide_conv="channels")
  assert wide[conv_name].factor == "channels"
  assert wide[conv_name].in_dim == shape[-1] + spec.has_bias
  layers = {**found, **wide}
  with pytest.raises(ValueError, match="choose one of"):
    dataclasses.replace(spec, factor="channel")
  dense = next(s for s in found.values() if s.kind == "dense")
  with pytest.raises(ValueError, match="for conv layers"):
    dataclasses.replace(dense, factor="channels")
  tx = kfac.kfac(layers, damping=0.05, inversion="cholesky")
  params, update = one_update(model, layers, tx, batch)
  expected = reference_update(conv, rename_conv(params), batch, 0.05, channels=True)
  got = rename_conv(update)
  for name, leaves in expected.items():
    for leaf, want in leaves.items():
      err = np.linalg.norm(got[name][leaf] - want) / np.linalg.norm(want)
      assert err < 1e-5, (net, name, leaf, err)


@pytest.mark.parametrize("factor", kfac.FACTORS)
def test_preconditioning_from_the_batch_factors_matches_numpy_reference(factor):
  """Batch 2: each layer's gradient `Xᵀ Γ` has few rows (16 conv positions, 2 examples),
  so `grad_factors` preconditions it as `(X A⁻¹)ᵀ (Γ G⁻¹)`; the numbers must not change."""
  conv = Conv3D(64, (3, 3, 3), strides=(2, 2, 2))
  model, batch = Net(conv), batch_for((2, 4, 4, 4, 4))
  layers = {name: dataclasses.replace(spec, factor=factor) if spec.kind == "conv" else spec
            for name, spec in kfac.find_layers(model, batch["x"]).items()}
  positions = {"conv": 16, "Dense_0": 2, "Dense_1": 2}
  cheaper = {name for name, spec in layers.items()
             if 2 * kfac.precondition_flops(spec, positions[name]) < kfac.precondition_flops(spec)}
  assert cheaper == {"conv", "Dense_0"}  # Dense_1 (5 -> 3) is cheaper as it is
  expected, errors = None, {}
  for grad_factors in (True, False):
    tx = kfac.kfac(layers, damping=0.05, inversion="cholesky", grad_factors=grad_factors)
    params, update = one_update(model, layers, tx, batch)
    if expected is None:
      expected = reference_update(conv, rename_conv(params), batch, 0.05,
                                  channels=factor == "channels")
    got = rename_conv(update)
    errors[grad_factors] = {(name, leaf): np.linalg.norm(got[name][leaf] - want)
                            / np.linalg.norm(want)
                            for name, leaves in expected.items() for leaf, want in leaves.items()}
  for key, err in errors[True].items():
    # Dense_0's A is 513 wide from 2 examples: fp32 rounding outside its range, amplified
    # by the damped inverse, is ~1e-4 of the update whichever way the gradient is
    # multiplied (the algebra alone is checked tightly in the next test); a wrong product
    # would be O(1) off.
    tol = 1e-3 if key[0] == "Dense_0" else 1e-5
    assert err < tol and errors[False][key] < tol, (key, err, errors[False][key])


@pytest.mark.parametrize("net,factor", [("dense", "patches"), ("conv3d_sdl_strided", "patches"),
                                        ("conv3d_sdl_strided", "channels"),
                                        ("conv3d_valid_no_bias", "channels")])
def test_precondition_factored_is_the_product_with_the_gradient(net, factor):
  """`(X A⁻¹)ᵀ (Γ G⁻¹)` against `A⁻¹ (Xᵀ Γ) G⁻¹` formed in float64, for the same
  well-conditioned inverses, X from the layer's real input patches."""
  conv, shape = NETS[net]
  model, batch = Net(conv), batch_for(shape)
  first = next(iter(kfac.find_layers(model, batch["x"]).values()))
  spec = dataclasses.replace(first, factor=factor)
  params = model.init(jax.random.key(1), batch["x"])["params"]
  tagged = {spec.name: spec}
  forward = kfac.module_forward(model, batch["x"])
  eps = kfac.zero_perturbations(forward, tagged, params)
  x = kfac.tagged_forward(forward, tagged, params, eps)[1][0][spec.name]
  rng = np.random.default_rng(3)
  g = jnp.asarray(rng.normal(size=kfac.by_layer(eps)[spec.name].shape), jnp.float32)
  spd = lambda d: (lambda m: m @ m.T / d + np.eye(d))(rng.normal(size=(d, d)))
  a_inv, g_inv = spd(spec.in_dim), spd(spec.out_dim)
  kernel = params[spec.path[0]]["kernel"]
  bias = params[spec.path[0]].get("bias")
  got = kfac.precondition_factored(spec, kernel, bias, *kfac.gradient_factors(spec, x, g),
                                   jnp.asarray(a_inv, jnp.float32),
                                   jnp.asarray(g_inv, jnp.float32), 0.5)
  rows, gamma = (np.asarray(v, np.float64) for v in kfac.gradient_factors(spec, x, g))
  if factor == "channels":  # I_taps ⊗ A_c on the kernel rows, the bias on its own entry
    c = spec.kernel_shape[-2]
    want_k = np.einsum("cd,ptd,po->tco", a_inv[:c, :c], rows, gamma) @ g_inv * 0.5
    want_b = a_inv[c, c] * gamma.sum(0) @ g_inv * 0.5 if bias is not None else None
  else:
    full = a_inv @ (rows.T @ gamma) @ g_inv * 0.5
    want_k, want_b = full[:kernel.size // kernel.shape[-1]], full[-1]
  want_k = want_k.reshape(kernel.shape)
  assert np.linalg.norm(got[0] - want_k) < 1e-5 * np.linalg.norm(want_k)
  if bias is not None:
    assert np.linalg.norm(got[1] - want_b) < 1e-5 * np.linalg.norm(want_b)
  else:
    assert got[1] is None


def test_adaptive_step_minimises_the_exact_quadratic_model():
  """Two adaptive steps against numpy: the explicit Jacobian gives the Gauss-Newton matrix
  C, and (α, μ) minimise gᵀs + ½ sᵀ(C + λI)s over s = α Δ + μ (previous step)."""
  from jax.flatten_util import ravel_pytree
  model, damping = Net(None), 0.05
  batches = [batch_for((64, 7)), batch_for((64, 7), seed=1)]
  layers = kfac.find_layers(model, batches[0]["x"])
  # Inverses only at step 0, so the second step's Δ uses the same (A⁻¹, G⁻¹).
  tx = optax.chain(kfac.kfac(layers, damping=damping, adaptive=True, stats_every=100,
                             inverse_every=100, inversion="cholesky"), optax.sgd(1.0))
  state = state_for(model, batches[0]["x"], tx)
  step = jax.jit(kfac_step(model, layers, mse, tx))
  params = [state.params]
  for b in batches:
    state, _ = step(state, b)
    params.append(state.params)
  inverses = {k: [np.asarray(m, np.float64) for m in v]
              for k, v in state.opt_state[0].inverses.items()}
  _, unravel = ravel_pytree(params[0])
  previous = None
  for k, b in enumerate(batches):
    theta = np.asarray(ravel_pytree(params[k])[0], np.float64)
    f = lambda th: model.apply({"params": unravel(th)}, b["x"])
    jac = np.asarray(jax.jacfwd(f)(jnp.asarray(theta, jnp.float32)), np.float64)
    jac = jac.reshape(-1, theta.size)                       # [N * outputs, P]
    resid = (np.asarray(f(jnp.asarray(theta, jnp.float32)), np.float64)
             - np.asarray(b["y"], np.float64)).reshape(-1)
    n = b["x"].shape[0]
    grad, curv = jac.T @ resid / n, jac.T @ jac / n         # of ½ mean_n ‖f - y‖²
    g = jax.tree.map(np.asarray, unravel(jnp.asarray(grad, jnp.float32)))
    direction = {}
    for name, p in g.items():
      mat = p["kernel"] if "bias" not in p else np.vstack([p["kernel"], p["bias"][None]])
      u = inverses[name][0] @ mat @ inverses[name][1]
      direction[name] = {"kernel": u[:p["kernel"].shape[0]]}
      if "bias" in p:
        direction[name]["bias"] = u[-1]
    delta = np.asarray(ravel_pytree(direction)[0], np.float64)
    vecs = [delta] if previous is None else [delta, previous]
    m = np.array([[a @ (curv + damping * np.eye(len(a))) @ c for c in vecs] for a in vecs])
    coef = -np.linalg.solve(m, np.array([grad @ v for v in vecs]))
    want = sum(c * v for c, v in zip(coef, vecs))
    have = np.asarray(ravel_pytree(params[k + 1])[0], np.float64) - theta
    err = np.linalg.norm(have - want) / np.linalg.norm(want)
    assert err < 1e-4, (k, coef, err)
    previous = have
  assert len(coef) == 2 and abs(coef[1]) > 1e-3  # the second step did use momentum


def test_adaptive_step_with_sdls_direct_conv_kernel_equals_the_xla_path(monkeypatch):
  """The Gauss-Newton products transpose the model's pullback. sdl's direct CPU
  convolution (a custom call, no transpose rule) takes a first layer of 4 channels: the
  adaptive step must trace (`kfac` keeps that pass on XLA's ops) and match the same steps
  traced with the kernel off everywhere."""
  from sdl.kernels import conv3d as direct_kernels
  monkeypatch.setenv("SDL_DIRECT_CONV", "on")  # also on a CPU that `use_direct` skips
  model = Net(Conv3D(16, (3, 3, 3)))
  # 5 x 5 output planes: above `GEMM_MAX_PLANE`, so the layer takes the direct kernel
  batches = [batch_for((8, 3, 5, 5, 4)), batch_for((8, 3, 5, 5, 4), seed=1)]
  layers = kfac.find_layers(model, batches[0]["x"])
  tx = optax.chain(kfac.kfac(layers, damping=0.05, adaptive=True, inverse_every=100,
                             inversion="cholesky"), optax.sgd(1.0))
  # the kernel has no transpose rule: the caller hands K-FAC the switch that turns it off
  step = kfac_step(model, layers, mse, tx, transposable=direct_kernels.disabled)
  with_kernel = jax.jit(step).lower(state_for(model, batches[0]["x"], tx), batches[0])
  assert direct_kernels.FORWARD in with_kernel.as_text()  # the model's own passes use it
  results = []
  for off in (False, True):
    state, run = state_for(model, batches[0]["x"], tx), jax.jit(step)
    with direct_kernels.disabled() if off else contextlib.nullcontext():
      for b in batches:
        state, _ = run(state, b)
    results.append(state.params)
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_sampled_fisher_matches_closed_forms():
  """Dense output layer: G = E[εεᵀ] = I for a unit Gaussian, and
  G = E_x[diag(p) - p pᵀ] for softmax logits (Monte Carlo over 20k examples)."""
  class Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4)(x)

  model = Linear()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(20000, 3)), jnp.float32)
  layers = kfac.find_layers(model, x)
  for likelihood in ("gaussian", "categorical"):
    tx = kfac.kfac(layers)
    state = state_for(model, x, tx)
    step = jax.jit(kfac_step(model, layers, lambda o, b: (jnp.mean(o), {}), tx,
                                        fisher="sampled", likelihood=likelihood))
    new, _ = step(state, {"x": x})
    _, big_g = new.opt_state.factors["Dense_0"]
    big_a, _ = new.opt_state.factors["Dense_0"]
    xa = np.concatenate([np.asarray(x, np.float64), np.ones((len(x), 1))], axis=1)
    np.testing.assert_allclose(big_a, xa.T @ xa / len(x), rtol=1e-5, atol=1e-6)
    if likelihood == "gaussian":
      want = np.eye(4)
    else:
      logits = np.asarray(model.apply({"params": state.params}, x), np.float64)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      want = np.mean([np.diag(q) - np.outer(q, q) for q in p], axis=0)
    assert np.abs(np.asarray(big_g) - want).max() < 0.04 * np.abs(want).max(), likelihood


def test_exact_fisher_is_the_gauss_newton_factor():
  """fisher='exact': G of each layer is Σ_o E[g_o g_oᵀ], g_o the layer's output gradient of
  output o, here checked in float64 numpy for a tanh MLP (the last layer's G is then I)."""
  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
      hidden = jnp.tanh(nn.Dense(5)(x))
      return nn.Dense(3)(hidden)

  model = Mlp()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 4)), jnp.float32)
  layers = kfac.find_layers(model, x)
  tx = kfac.kfac(layers)
  state = state_for(model, x, tx)
  step = jax.jit(kfac_step(model, layers, lambda o, b: (jnp.mean(o ** 2), {}), tx,
                                      fisher="exact", likelihood="gaussian"))
  new, _ = step(state, {"x": x})
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), state.params)
  hidden = np.tanh(np.asarray(x, np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  # ∂f_o/∂z = W2[:, o] ⊙ tanh'(z), per example
  g = [(1 - hidden ** 2) * p["Dense_1"]["kernel"][:, o] for o in range(3)]
  want = sum(go.T @ go for go in g) / len(x)
  np.testing.assert_allclose(new.opt_state.factors["Dense_0"][1], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.opt_state.factors["Dense_1"][1], np.eye(3), atol=1e-6)
  with pytest.raises(ValueError, match="gaussian"):
    kfac_step(model, layers, lambda o, b: (o, {}), tx, fisher="exact",
                         likelihood="categorical")


def test_find_layers_leaves_shared_and_unsupported_layers_to_the_fallback():
  class Mixed(nn.Module):
    @nn.compact
    def __call__(self, x):
      shared = nn.Dense(4, name="shared")
      x = shared(shared(x))
      x = nn.Conv(4, (3,), padding="CIRCULAR", name="circular")(x[:, :, None])
      x = nn.ConvTranspose(4, (3,), strides=(2,), name="transposed")(x)
      x = nn.Conv(4, (3,), kernel_dilation=2, name="dilated")(x)
      x = nn.Conv(4, (3,), feature_group_count=2, name="grouped")(x)
      x = nn.LayerNorm(name="norm")(x)
      x = nn.Embed(3, 2, name="embed")(jnp.zeros(x.shape[:1], jnp.int32)) + x.sum()
      return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))

  x = jnp.ones((2, 4))
  assert set(kfac.find_layers(Mixed(), x)) == {"head"}


def test_find_layers_reads_attributes_not_classes():
  """A layer class sdl has never seen is factored when its attributes say what it is."""
  class MyDense(nn.Module):
    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
      kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
      return x @ kernel + self.param("bias", nn.initializers.zeros, (self.features,))

  class MyConv(nn.Module):
    features: int
    kernel_size: tuple = (3, 3)
    strides: tuple = (2, 1)
    padding: str = "SAME"
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
      kernel = self.param("kernel", nn.initializers.lecun_normal(),
                          (*self.kernel_size, x.shape[-1], self.features))
      return lax.conv_general_dilated(x, kernel, self.strides, self.padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = MyConv(4, name="conv")(x)
      return MyDense(3, name="dense")(x.reshape(x.shape[0], -1))

  layers = kfac.find_layers(Net(), jnp.ones((2, 6, 5, 2)))
  # 'SAME' at stride 2 over 6 rows pads (0, 1), as XLA does
  assert layers["conv"] == kfac.LayerSpec(("conv",), "conv", (3, 3, 2, 4), False, (2, 1),
                                          ((0, 1), (1, 1)))
  assert layers["dense"] == kfac.LayerSpec(("dense",), "dense", (60, 3), True)


def test_diagonal_fallback_and_norm_clip():
  class Normed(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.LayerNorm()(x))

  model, batch = Normed(), batch_for((8, 4))
  layers = kfac.find_layers(model, batch["x"])
  decay, damping = 0.9, 0.01
  tx = kfac.kfac(layers, damping=damping, factor_decay=decay, fallback="diagonal")
  params, update = one_update(model, layers, tx, batch)
  grads = jax.grad(lambda p: mse(model.apply({"params": p}, batch["x"]), batch)[0])(params)
  g = np.asarray(grads["LayerNorm_0"]["scale"], np.float64)
  np.testing.assert_allclose(update["LayerNorm_0"]["scale"],
                             g / ((1 - decay) * g * g + damping), rtol=1e-4)
  # Norm clip: the same update scaled down to norm 1e-3 overall.
  tx = kfac.kfac(layers, damping=damping, factor_decay=decay, fallback="diagonal",
                 norm_clip=1.0)
  _, clipped = one_update(model, layers, tx, batch)
  assert optax.tree.norm(update) > 10
  assert optax.tree.norm(clipped) == pytest.approx(1.0, rel=1e-4)
  ratio = np.asarray(clipped["Dense_0"]["kernel"]) / np.asarray(update["Dense_0"]["kernel"])
  np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-4)


def test_refresh_counts_follow_stats_every_inverse_every_and_stale_fisher():
  model = Net(nn.Conv(3, (3,), padding="SAME"))
  shape = (4, 6, 2)
  layers = kfac.find_layers(model, jnp.zeros(shape))

  def run(steps, vary_batch, lr, **kw):
    tx = optax.chain(kfac.kfac(layers, **kw), optax.sgd(lr))
    state = state_for(model, jnp.zeros(shape), tx)
    step = jax.jit(kfac_step(model, layers, mse, tx))
    for i in range(steps):
      state, _ = step(state, batch_for(shape, seed=i if vary_batch else 0))
    return state.opt_state[0]

  s = run(12, True, 0.01, stats_every=3, inverse_every=5)
  assert int(s.stats_updates) == 4                                  # steps 0, 3, 6, 9
  assert {int(v) for v in s.inversions.values()} == {3}             # steps 0, 5, 10
  # Stale Fisher: with the same batch and lr 0 the factors never move after the first
  # estimate, so each layer is inverted once; with fresh batches every inverse step counts.
  s = run(6, False, 0.0, stale_tolerance=1e-3)
  assert {int(v) for v in s.inversions.values()} == {1}
  s = run(6, True, 0.01, stale_tolerance=1e-6)
  assert {int(v) for v in s.inversions.values()} == {6}
  # In between, a tolerance can skip one layer but not another: counts are per layer.
  s = run(8, True, 0.01, stale_tolerance=0.05, factor_decay=0.5)
  assert all(1 <= int(v) <= 8 for v in s.inversions.values())


def test_factors_average_uniformly_until_the_ema_weighs_more():
  """Weights of the successive estimates: 1, 1/2, 1/3, then 1 - decay = 0.3 (not 1/4)."""
  model, shape = Net(None), (16, 5)
  layers = kfac.find_layers(model, jnp.zeros(shape))
  tx = optax.chain(kfac.kfac(layers, factor_decay=0.7), optax.sgd(0.0))
  state = state_for(model, jnp.zeros(shape), tx)
  step = jax.jit(kfac_step(model, layers, mse, tx))
  expected = None
  for i, weight in enumerate((1.0, 1 / 2, 1 / 3, 0.3)):
    batch = batch_for(shape, seed=10 + i)
    state, _ = step(state, batch)
    a = np.concatenate([np.asarray(batch["x"], np.float64), np.ones((shape[0], 1))], 1)
    estimate = a.T @ a / shape[0]  # the first dense layer's input factor, bias row added
    expected = estimate if expected is None else (1 - weight) * expected + weight * estimate
    np.testing.assert_allclose(state.opt_state[0].factors["Dense_0"][0], expected,
                               rtol=1e-5, atol=1e-6)


def test_chained_with_momentum_and_schedule_compiles_once():
  model, batch = Net(nn.Conv(2, (3, 3), padding="SAME")), batch_for((4, 5, 5, 2))
  layers = kfac.find_layers(model, batch["x"])
  schedule = optax.cosine_decay_schedule(0.1, 10)
  tx = optax.chain(optax.clip_by_global_norm(10.0),
                   kfac.kfac(layers, damping=0.01, inverse_every=2, kl_clip=1e-2,
                             learning_rate=schedule),
                   optax.add_decayed_weights(1e-4), optax.sgd(schedule, momentum=0.9))
  step = jax.jit(chex.assert_max_traces(kfac_step(model, layers, mse, tx), n=1))
  state = state_for(model, batch["x"], tx)
  losses = []
  for i in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0]
  assert int(state.opt_state[1].count) == 6


@pytest.mark.parametrize("on_mesh,factored", [(False, False), (True, False), (True, True)])
def test_phased_steps_equal_the_counter_driven_step(on_mesh, factored):
  """One compiled step per phase (`kfac_phase`) does what `lax.cond` on the counter does.
  `factored`: a conv with one output position an example, whose gradient `grad_factors`
  preconditions from X and Γ, so steps without statistics tag that layer alone."""
  shape = (8, 2, 2, 2, 4) if factored else (8, 5, 5, 2)
  conv = (Conv3D(64, (3, 3, 3), strides=(2, 2, 2)) if factored
          else nn.Conv(3, (3, 3), padding="SAME"))
  model, batch = Net(conv), batch_for(shape)
  layers = kfac.find_layers(model, batch["x"])
  assert kfac.prefers_grad_factors(layers["conv"], 8) == factored
  chex.clear_trace_counter()  # counted by the step's code, shared across the cases
  axes = ("data",) if on_mesh else ()
  step_kw = dict(mesh=mesh_of((8,), axes, AxisType.Auto), axis_names=axes) if on_mesh else {}
  kw = dict(damping=0.02, stats_every=2, inverse_every=3, stale_tolerance=1e-9,
            inversion="cholesky", axis_names=axes)
  tx = optax.chain(kfac.kfac(layers, **kw), optax.sgd(0.1, momentum=0.9))
  fn = kfac_step(model, layers, mse, tx, **step_kw)
  counter = jax.jit(fn)
  phased = jax.jit(chex.assert_max_traces(fn, n=4), static_argnames="phase")
  a = b = state_for(model, batch["x"], tx)
  if on_mesh:  # laid out as the step returns it: a retrace would count against the 4
    a = b = jax.device_put(a, NamedSharding(step_kw["mesh"], P()))
  for i in range(7):  # phases (stats, inverse): TT FF TF FT TF FF TT
    data = batch_for(shape, seed=i)
    a, _ = counter(a, data)
    b, _ = phased(b, data, phase=kfac.phase_at(i, 2, 3))
  # Same arithmetic, differently fused: compare each leaf relative to its norm. Rounding
  # grows over 7 steps at lr 0.1 (jax 0.12 on 8 devices: 1.2e-5 in one factor); a phase
  # that skipped or repeated statistics or an inversion moves leaves by far more.
  for x, y in zip(jax.tree.leaves((a.params, a.opt_state)),
                  jax.tree.leaves((b.params, b.opt_state))):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.linalg.norm(y - x) <= 5e-5 * max(np.linalg.norm(x), 1e-6), (x.shape, y.shape)
  assert int(b.opt_state[0].stats_updates) == 4  # steps 0, 2, 4, 6
  assert {int(v) for v in b.opt_state[0].inversions.values()} <= {1, 2, 3}  # steps 0, 3, 6
  # A plain step neither inverts nor tags: no Cholesky, no statistics GEMMs in it.
  hlo = lambda phase: phased.lower(b, batch, phase=phase).as_text()
  assert "potrf" not in hlo(kfac.Phase(False, False))
  assert "potrf" in hlo(kfac.Phase(False, True))  # LAPACK (CPU) or cuSOLVER (GPU)
  assert hlo(kfac.Phase(False, False)).count("dot_general") < hlo(
      kfac.Phase(True, False)).count("dot_general")


def test_kl_clip_bounds_the_quadratic_model_change():
  model, batch = Net(None), batch_for((6, 7))
  layers = kfac.find_layers(model, batch["x"])
  lr, clip = 0.5, 1e-4
  params, free = one_update(model, layers, kfac.kfac(layers, damping=0.05), batch)
  _, clipped = one_update(model, layers, kfac.kfac(layers, damping=0.05, kl_clip=clip,
                                                   learning_rate=lr), batch)
  grads = jax.grad(lambda p: mse(model.apply({"params": p}, batch["x"]), batch)[0])(params)
  vg = sum(float(jnp.vdot(u, g)) for u, g in zip(jax.tree.leaves(free), jax.tree.leaves(grads)))
  # Ba et al. (2017): the step ν·v with ν = min(1, sqrt(κ / (lr² vᵀg))) changes the model's
  # predictive distribution by lr² ν² vᵀFv = lr² ν² vᵀg = κ (KL, to second order).
  nu = float(optax.tree.norm(clipped) / optax.tree.norm(free))
  assert nu < 1
  assert lr ** 2 * nu ** 2 * vg == pytest.approx(clip, rel=1e-3)


def test_per_layer_kl_clip_gives_each_module_an_equal_share():
  """kl_clip_per_layer: each module's update is scaled by its own ν_m = min(1, sqrt((κ/M) /
  (lr² v_mᵀg_m))), M modules, so a module whose step is large no longer shrinks the others."""
  model, batch = Net(nn.Conv(3, (3,))), batch_for((16, 6, 2))
  layers = kfac.find_layers(model, batch["x"])
  lr, clip = 0.5, 1e-4
  params, free = one_update(model, layers, kfac.kfac(layers, damping=0.05), batch)
  _, clipped = one_update(model, layers, kfac.kfac(layers, damping=0.05, kl_clip=clip,
                                                   learning_rate=lr, kl_clip_per_layer=True),
                          batch)
  grads = jax.grad(lambda p: mse(model.apply({"params": p}, batch["x"]), batch)[0])(params)
  modules = list(free)
  assert len(modules) == 3
  nus = []
  for m in modules:
    vg = sum(float(jnp.vdot(u, g)) for u, g in zip(jax.tree.leaves(free[m]),
                                                    jax.tree.leaves(grads[m])))
    nu = float(optax.tree.norm(clipped[m]) / optax.tree.norm(free[m]))
    want = min(1.0, math.sqrt(clip / len(modules) / (lr ** 2 * abs(vg))))
    assert nu == pytest.approx(want, rel=1e-3), m
    for u, c in zip(jax.tree.leaves(free[m]), jax.tree.leaves(clipped[m])):
      # updates recovered as new - old params: float32 cancellation against |params| ~ 1
      np.testing.assert_allclose(np.asarray(c), nu * np.asarray(u), rtol=1e-3,
                                 atol=1e-3 * np.abs(np.asarray(c)).max())
    nus.append(nu)
  assert len({round(n, 4) for n in nus}) == 3  # the modules were scaled differently


# ---- distributed -------------------------------------------------------------------------


def mesh_of(shape, axes, axis_type):
  devices = np.asarray(jax.devices()[:math.prod(shape)]).reshape(shape)
  return Mesh(devices, axes, axis_types=(axis_type,) * len(axes))


@pytest.mark.parametrize("axes,shape,option", [(("data",), (8,), "patches"),
                                               (("node", "local"), (2, 4), "patches"),
                                               (("node", "local"), (2, 4), "channels"),
                                               (("data",), (8,), "adaptive"),
                                               (("node", "local"), (2, 4), "factored")])
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_distributed_update_equals_one_device(axes, shape, option, axis_type):
  """option: the conv's factor ("patches", "channels"), "adaptive" (patches, with the
  quadratic-model step, whose Gauss-Newton products are averaged over the devices), or
  "factored" (a conv whose 8 output positions, one an example, make `grad_factors`
  gather X and Γ from the devices and precondition from them)."""
  model = Net(Conv3D(64 if option == "factored" else 3, (3, 3, 3),
                     strides=(2, 2, 2) if option == "factored" else (2, 1, 1)))
  batch_shape = (8, 2, 2, 2, 4) if option == "factored" else (16, 4, 4, 4, 2)
  batch = batch_for(batch_shape)
  factor = "channels" if option == "channels" else "patches"
  layers = {name: dataclasses.replace(spec, factor=factor) if spec.kind == "conv" else spec
            for name, spec in kfac.find_layers(model, batch["x"]).items()}
  if option == "factored":
    assert 2 * kfac.precondition_flops(layers["conv"], 8) < kfac.precondition_flops(
        layers["conv"])
  kw = dict(damping=0.02, stats_every=1, inverse_every=1, stale_tolerance=1e-9,
            adaptive=option == "adaptive", learning_rate=0.1)
  steps = 3

  def train(tx, **step_kw):
    state = state_for(model, batch["x"], tx)
    step = jax.jit(kfac_step(model, layers, mse, tx, **step_kw))
    for i in range(steps):
      state, _ = step(state, batch_for(batch_shape, seed=i))
    return state

  ref = train(optax.chain(kfac.kfac(layers, **kw), optax.sgd(0.1)))
  mesh = mesh_of(shape, axes, axis_type)
  tx = optax.chain(kfac.kfac(layers, axis_names=axes, **kw), optax.sgd(0.1))
  got = train(tx, mesh=mesh, axis_names=axes)
  init = state_for(model, batch["x"], tx).params
  # Same computation, different fp32 summation order (three steps through the inverses):
  # compare the parameter change.
  for (path, a), b, p0 in zip(jax.tree_util.tree_leaves_with_path(got.params),
                              jax.tree.leaves(ref.params), jax.tree.leaves(init)):
    change = np.asarray(b) - np.asarray(p0)
    err = np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(change)
    assert err < 5e-5, (path, err)
  assert ({k: int(v) for k, v in got.opt_state[0].inversions.items()}
          == {k: int(v) for k, v in ref.opt_state[0].inversions.items()})


def test_collectives_are_hierarchical_low_precision_and_inverses_split():
  model = Net(nn.Conv(3, (3, 3), padding="SAME"))
  batch = batch_for((8, 5, 5, 2))
  layers = kfac.find_layers(model, batch["x"])
  axes = ("node", "local")
  mesh = mesh_of((2, 4), axes, AxisType.Auto)
  tx = kfac.kfac(layers, axis_names=axes, comm_dtype=jnp.bfloat16, damping=0.05)
  state = state_for(model, batch["x"], tx)
  step = jax.jit(kfac_step(model, layers, mse, tx, mesh=mesh, axis_names=axes,
                                      grad_dtype=jnp.bfloat16))
  # What the program asks for (a backend may widen bf16 reductions it cannot do natively).
  hlo = step.lower(state, batch).as_text()
  scatters = re.findall(r"stablehlo\.reduce_scatter.*?\}\) : \((tensor<[^>]*>)\)", hlo, re.S)
  # Gradients and factor statistics travel in bf16; the three layers' inverses, each made by
  # its owner, are shared in fp32.
  assert sum("bf16" in t for t in scatters) == 2, scatters
  assert sum("xf32" in t for t in scatters) == len(layers) == 3, scatters
  assert "all_gather" in hlo
  # Three layers over 8 devices: each inverted by exactly one device, spread by cost.
  owner = kfac.assign_inverses(layers, 8)
  assert len(set(owner.values())) == 3
  # bf16 communication: close to the fp32 single-device update, not equal. (With much less
  # damping, bf16 rounding of the gradient in low-curvature directions, amplified by 1/λ,
  # can turn the update far from the fp32 one.)
  _, got = one_update(model, layers, tx, batch, mesh=mesh, axis_names=axes,
                      grad_dtype=jnp.bfloat16)
  _, ref = one_update(model, layers, kfac.kfac(layers, damping=0.05), batch)
  got, ref = (np.concatenate([x.ravel() for x in jax.tree.leaves(t)]) for t in (got, ref))
  assert got @ ref / np.linalg.norm(got) / np.linalg.norm(ref) > 0.995
  assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.1


def test_bf16_factor_storage_inverts_in_fp32():
  model, batch = Net(nn.Conv(3, (3,), padding="SAME")), batch_for((64, 6, 2))
  layers = kfac.find_layers(model, batch["x"])
  tx = kfac.kfac(layers, damping=0.05, factor_dtype=jnp.bfloat16)
  state = state_for(model, batch["x"], tx)
  new, _ = jax.jit(kfac_step(model, layers, mse, tx))(state, batch)
  assert all(f.dtype == jnp.bfloat16 for f in jax.tree.leaves(new.opt_state.factors))
  assert all(i.dtype == jnp.float32 for i in jax.tree.leaves(new.opt_state.inverses))
  _, got = one_update(model, layers, tx, batch)
  _, ref = one_update(model, layers, kfac.kfac(layers, damping=0.05), batch)
  got, ref = (np.concatenate([x.ravel() for x in jax.tree.leaves(t)]) for t in (got, ref))
  assert got @ ref / np.linalg.norm(got) / np.linalg.norm(ref) > 0.999
  assert 0 < np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05  # rounded, not equal


class Hybrid(nn.Module):
  """A 3D CNN as the hybrid trainers split it: a conv whose output depth divides over the
  spatial shards, a strided one whose single output position does not, then a dense
  head."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(2, (3, 3, 3), padding="SAME", name="conv0")(x))
    x = jnp.tanh(nn.Conv(3, (4, 3, 3), strides=(4, 3, 3), padding="VALID", name="conv1")(x))
    x = jnp.tanh(nn.Dense(5)(x.reshape(x.shape[0], -1)))
    return nn.Dense(3, use_bias=False)(x)


@pytest.mark.parametrize("shape,axes,batch_axes,factored",
                         [((2, 2), ("data", "spatial"), ("data",), False),
                          ((2, 2, 2), ("node", "local", "spatial"), ("node", "local"), False),
                          ((2, 2, 2), ("node", "local", "spatial"), ("node", "local"), True)])
def test_gspmd_layout_on_a_data_x_spatial_mesh_equals_one_device(shape, axes, batch_axes,
                                                                 factored):
  """K-FAC in a GSPMD step over a data x spatial mesh (volumes split over the batch and
  depth, XLA exchanging the conv halos), its statistics summed and inverses split by the
  transform's own `shard_map` (`kfac.Layout`): every update equals one device's within
  1e-5 relative, over a step with statistics and inverses, a plain one, one with statistics
  only and one with inverses only. `factored`: the deep layers' gradients preconditioned
  from their factors (few positions), gathered by XLA."""
  model = Hybrid()
  volume = (80, 4, 3, 3, 2)  # more examples than conv1's 73 inputs (NETS' comment)
  batches = [batch_for(volume, seed=i) for i in range(4)]
  layers = kfac.find_layers(model, batches[0]["x"])
  assert set(layers) == {"conv0", "conv1", "Dense_0", "Dense_1"}
  kw = dict(damping=0.02, stats_every=2, inverse_every=3, stale_tolerance=1e-9,
            grad_factors=factored)
  phases = [kfac.phase_at(i, 2, 3) for i in range(len(batches))]
  assert [(p.stats, p.inverse) for p in phases] == [(True, True), (False, False),
                                                    (True, False), (False, True)]
  mesh = mesh_of(shape, axes, AxisType.Auto)
  layout = kfac.Layout(mesh, batch_axes, ("spatial",))
  # conv0's 36 output positions split over 2 spatial shards; conv1's single one cannot.
  x = batches[0]["x"]
  a0, _ = kfac.factor_rows(layers["conv0"], x, jnp.zeros((80, 4, 3, 3, 2)))
  a1, _ = kfac.factor_rows(layers["conv1"], jnp.zeros((80, 4, 3, 3, 2)),
                           jnp.zeros((80, 1, 1, 1, 3)))
  assert layout.rows_spec(a0.shape) == P(batch_axes, ("spatial",), None)
  assert layout.rows_spec(a1.shape) == P(batch_axes, None, None) and layout.copies(
      layout.rows_spec(a1.shape)) == 2

  def jitted(tx, sharded: bool):
    step = make_train_step(Model(model), mse, tx,
                           gradients=kfac.gradients(layers, grad_factors=factored))
    if not sharded:
      return jax.jit(step, static_argnums=2)
    data = {"x": NamedSharding(mesh, P(batch_axes, "spatial")),
            "y": NamedSharding(mesh, P(batch_axes))}
    return jax.jit(step, in_shardings=(NamedSharding(mesh, P()), data),
                   out_shardings=NamedSharding(mesh, P()), static_argnums=2)

  ref_tx = optax.chain(kfac.kfac(layers, **kw), optax.sgd(0.1))
  ref_step = jitted(ref_tx, False)
  step = jitted(optax.chain(kfac.kfac(layers, layout=layout, **kw), optax.sgd(0.1)), True)
  # Each update from the same state (one device's trajectory), so that the comparison is
  # of one update, not of rounding carried over from the ones before.
  state = state_for(model, x, ref_tx)
  for i, (batch, phase) in enumerate(zip(batches, phases)):
    want, _ = ref_step(state, batch, phase)
    got, _ = step(state, batch, phase)
    for (path, a), b, p0 in zip(jax.tree_util.tree_leaves_with_path(got.params),
                                jax.tree.leaves(want.params), jax.tree.leaves(state.params)):
      change = np.asarray(b) - np.asarray(p0)
      err = np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(change)
      assert err < 1e-5, (i, path, err)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got.opt_state[0].factors),
                            jax.tree.leaves(want.opt_state[0].factors)):
      err = np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))
      assert err < 1e-5, (i, path, err)
    state = want
  assert ({k: int(v) for k, v in got.opt_state[0].inversions.items()}
          == {k: int(v) for k, v in state.opt_state[0].inversions.items()} == {
              k: 2 for k in layers})
  # The statistics travel as one buffer, hierarchically over node (a reduce-scatter within
  # the node) when the mesh has one; each layer's inverses come from its owner, shared by
  # an all-reduce; the inversions are spread by cost over the devices.
  hlo = step.lower(state_for(model, x, ref_tx), batches[0], phases[0]).as_text()
  assert ("reduce_scatter" in hlo) == ("node" in axes)
  assert len(set(kfac.assign_inverses(layers, math.prod(shape)).values())) == len(layers)
