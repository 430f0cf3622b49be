"""K-FAC: Kronecker-factored approximate curvature as an optax transform.

For a layer with weights `W` `[d_in, d_out]` (bias appended as a last row, inputs extended
with a 1), inputs `a` and per-example output gradients `g`, K-FAC approximates the Fisher
block as `A ⊗ G` (Martens & Grosse 2015, eq. 1-2) with

    A = 1/(N T) Σ_{n,t} a_{n,t} a_{n,t}ᵀ        G = 1/N Σ_{n,t} g_{n,t} g_{n,t}ᵀ

where `t` runs over the `T` positions a weight is shared across: one for a dense layer,
the output voxels of a convolution (KFC, Grosse & Martens 2016, eq. 29-30; `a` is then the
input patch `[kernel taps x channels]`). The update is `(A + π√λ I)⁻¹ ∇W (G + √λ/π I)⁻¹`,
the factored Tikhonov damping of Martens & Grosse §6.3 with
`π = sqrt((tr A / dim A) / (tr G / dim G))` (or `π = 1` with `pi_damping=False`).

How statistics reach the transform. Models stay pure Flax modules; `find_layers` records
the dense and convolution layers (1D/2D/3D, any stride and padding) the model calls, read
by their attributes (`features`, `use_bias`, `kernel_size`, `strides`, `padding`), whatever
their class, with their static geometry. `tagged_forward` runs the model with a Flax
method interceptor that `sow`s each such layer's input and `perturb`s its output, so one
`jax.vjp` gives the parameter gradients and the output gradients. `gradients(...)` is the
gradients function that the project's one train step (`sdl.train.step.make_train_step`)
calls; it hands the transform a `LayerStats` through optax's extra arguments. Every other parameter (norm
scales, embeddings, layers called twice) gets the fallback: the identity, or a diagonal
Fisher `g / (EMA(g²) + λ)`.

What the options do (all periodic work is a pure function of the step count):
  relative_damping λ_A λ_G = λ · (tr A / dim A)(tr G / dim G): each layer damped in
                   proportion to its own mean curvature (on CosmoFlow it saturated the
                   tanh output where absolute λ = 0.1 did not; docs/benchmarks.md);
  stats_every      factors are re-estimated every T_stats updates: a running mean of the
                   estimates (the first replaces the identity) until the k-th would count
                   less than `1 - factor_decay`, an EMA with `factor_decay` from then on.
                   With small batches the plain EMA let the first batch dominate for
                   dozens of estimates (0.95^10 = 0.6 of the weight after ten);
  inverse_every    damped inverses every T_inv updates, by `eigh` or `cholesky`;
  stale_tolerance  stale Fisher (Osawa et al., SP-NGD): at an inverse step a layer is only
                   re-inverted if one of its factors moved by more than this (relative
                   Frobenius norm) since its last inversion;
  factor_dtype     storage of the factors (bf16 halves their memory); inversion is fp32;
  comm_dtype       dtype of the factor all-reduce;
  kl_clip          scale updates so that lr² Σ ⟨update, grad⟩ ≤ kl_clip (Ba et al. 2017);
  kl_clip_per_layer  give each module (a parameter's path without its leaf) its own scale,
                   so that its lr² ⟨update, grad⟩ ≤ kl_clip / modules: one module's large
                   step (the identity fallback's raw gradient, a head layer's) no longer
                   shrinks every other module's. On the CosmoFlow probes it brought the end
                   of the plateau forward (docs/benchmarks.md, K-FAC);
  norm_clip        cap the preconditioned update's global norm;
  adaptive         step size and momentum from the exact quadratic model (Martens & Grosse
                   §7): the step is α Δ + μ δ, with Δ the preconditioned gradient and δ the
                   previous step, (α, μ) minimising gᵀs + ½ sᵀ(C + λ I)s where C is the
                   loss's Gauss-Newton matrix on this batch (`gradients` hands the
                   transform its 2 x 2 products, two Jacobian-vector products a step).
                   The transform then returns -(the step): chain it with `optax.sgd(1.0)`
                   (or another lr as a multiplier, which it needs as `learning_rate`), no
                   momentum, no KL clip;
  max_factor_dim   layers with a factor wider than this go to the fallback: preconditioning
                   costs 2(d_in² d_out + d_in d_out²) flops per step whatever the batch, so
                   one wide layer (CosmoFlow's conv5: 6,913 x 512) can cost more than the
                   whole forward/backward pass of a small batch;
  wide_conv        "channels": a conv layer whose patch factor is wider than
                   `max_factor_dim` keeps K-FAC with the channel factor I_taps ⊗ A_c
                   (`LayerSpec.factor`; c_in wide, not taps x c_in) instead of the fallback.
  grad_factors     precondition a layer's gradient `∇W = Xᵀ Γ` (X its input rows, Γ the
                   loss's gradients at its outputs, one row per example and position) as
                   `(X A⁻¹)ᵀ (Γ G⁻¹)` when its P rows make that cheaper than the product with
                   ∇W: `P (d_in² + d_in d_out + d_out²)` against `d_in² d_out + d_in d_out²`
                   multiply-adds (`prefers_grad_factors`). The same numbers; for CosmoFlow's
                   conv5 at 32³, batch 4 (P = 32), 15 x fewer flops, and the amortised
                   K-FAC step 1.31 x SGD's where it had been 1.50 x (`experiments.
                   kfac_profile`, docs/benchmarks.md). `gradients` tags
                   those layers (only) on steps without statistics too.

Distributed, two ways into the same collectives. With `axis_names` the step runs inside
`shard_map` (`make_train_step(batch_axes=...)`, data parallel only) and the transform sees
each device's own statistics. With `layout` (`Layout`) the step is one GSPMD program over
a data x spatial mesh (the hybrid trainers, on one process or many), activations split
over the batch and depth, and the transform enters `shard_map` itself for its statistics
and inversions. Either way factor statistics are summed over the mesh axes, hierarchically
with a `node` axis (reduce-scatter within the node, all-reduce across nodes, all-gather
within the node: `sdl.parallel.collectives.all_reduce_sum`), and the inverses are split
across the devices layer by layer (greedy by cost `d³`): each layer is inverted by its
owner only, which shares the result with an all-reduce of that layer's inverses (the other
devices contribute zeros).
"""
import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from sdl.ops.windows import window_patches
from sdl.optim.gradients import Gradients, split_state
from sdl.parallel.collectives import all_reduce_sum, device_count, device_index

INPUTS = "kfac_inputs"    # collection the interceptor sows layer inputs into
OUTPUTS = "kfac_outputs"  # collection of the zero perturbations on layer outputs
INVERSIONS = ("eigh", "cholesky")
FACTORS = ("patches", "channels")      # a conv layer's input factor (LayerSpec.factor)
WIDE_CONVS = ("fallback", "channels")  # what a conv too wide for max_factor_dim gets
FALLBACKS = ("identity", "diagonal")
FISHERS = ("empirical", "sampled", "exact")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Static description of one Kronecker-factored layer; `path` is its params path."""
  path: tuple[str, ...]
  kind: str                                 # "dense" | "conv"
  kernel_shape: tuple[int, ...]             # dense [d_in, d_out]; conv [*k, c_in, c_out]
  has_bias: bool
  strides: tuple[int, ...] = ()
  padding: tuple[tuple[int, int], ...] = ()  # explicit (low, high) per spatial dim
  # A conv layer's input factor: "patches", A over whole input patches [taps x channels];
  # "channels", A ≈ I_taps ⊗ A_c with A_c the patch factor's diagonal blocks averaged over
  # the taps (the bias, if any, gets its own diagonal entry 1, no cross terms).
  factor: str = "patches"

  def __post_init__(self):
    if self.factor not in FACTORS:
      raise ValueError(f"kfac LayerSpec {self.name}: factor={self.factor!r}, choose one of "
                       f"{FACTORS}")
    if self.factor == "channels" and self.kind != "conv":
      raise ValueError(f"kfac LayerSpec {self.name}: the channel factor is for conv layers, "
                       f"not {self.kind}")

  @property
  def name(self) -> str:
    return "/".join(self.path)

  @property
  def in_dim(self) -> int:
    if self.factor == "channels":
      return self.kernel_shape[-2] + self.has_bias
    return math.prod(self.kernel_shape[:-1]) + self.has_bias

  @property
  def out_dim(self) -> int:
    return self.kernel_shape[-1]


def _explicit_padding(padding, spatial, kernel, strides):
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      return None  # CIRCULAR / CAUSAL: left to the fallback
    return tuple(tuple(p) for p in lax.padtype_to_pads(spatial, kernel, strides, padding.upper()))
  if isinstance(padding, int):
    return ((padding, padding),) * len(kernel)
  return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def _tuple(value, nd: int) -> tuple:
  value = 1 if value is None else value
  return (value,) * nd if isinstance(value, int) else tuple(value)


def _layer_spec(module, x) -> LayerSpec | None:
  """A layer K-FAC can factor, read from the module's attributes (any class): `features`
  and `use_bias`, plus `kernel_size`, `strides` and `padding` for a convolution (no
  dilation, no feature groups). Its `kernel` parameter must have the implied shape."""
  path = tuple(module.scope.path)
  features, use_bias = getattr(module, "features", None), getattr(module, "use_bias", None)
  if not isinstance(features, int) or not isinstance(use_bias, bool):
    return None
  if getattr(module, "transpose_kernel", None) is not None:  # a transposed convolution
    return None
  kernel = module.variables.get("params", {}).get("kernel")
  size = getattr(module, "kernel_size", None)
  if size is None:  # dense: x @ kernel over the last axis
    if getattr(module, "axis", -1) not in (-1, (-1,)) or kernel is None:
      return None
    spec = LayerSpec(path, "dense", (x.shape[-1], features), use_bias)
  else:
    k = _tuple(size, 1)
    nd = len(k)
    dilated = any(_tuple(getattr(module, name, 1), nd) != (1,) * nd
                  for name in ("input_dilation", "kernel_dilation"))
    if dilated or getattr(module, "feature_group_count", 1) != 1 or x.ndim != nd + 2:
      return None
    s = _tuple(getattr(module, "strides", 1), nd)
    pads = _explicit_padding(getattr(module, "padding", "VALID"), x.shape[1:-1], k, s)
    if pads is None:
      return None
    spec = LayerSpec(path, "conv", (*k, x.shape[-1], features), use_bias, s, pads)
  if kernel is None or tuple(kernel.shape) != spec.kernel_shape:
    return None
  return spec


def find_layers(model: nn.Module, *args, **kwargs) -> dict[str, LayerSpec]:
  """The layers K-FAC can factor, found by tracing `model.init` abstractly with `args`:
  any module whose attributes describe a dense or convolution layer (`_layer_spec`).

  A layer whose module is called more than once (shared weights) is left to the fallback.
  """
  found, calls = {}, {}

  def record(next_fun, a, kw, context):
    out = next_fun(*a, **kw)  # first: the kernel exists once the call has run
    if context.method_name == "__call__" and a and hasattr(a[0], "shape"):
      spec = _layer_spec(context.module, a[0])
      if spec is not None:
        calls[spec.name] = calls.get(spec.name, 0) + 1
        found[spec.name] = spec
    return out

  rngs = {"params": jax.random.key(0), **kwargs.pop("rngs", {})}
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(rngs, *args, **kwargs))
  return {name: spec for name, spec in found.items() if calls[name] == 1}


def select_layers(layers: dict[str, LayerSpec], max_factor_dim: int = 0,
                  wide_conv: str = "fallback") -> dict[str, LayerSpec]:
  """The layers whose factors are at most `max_factor_dim` wide (all of them for 0).

  `wide_conv="channels"` keeps a conv layer whose patch factor is too wide with the channel
  factor (`LayerSpec.factor`) when that one fits; "fallback" leaves it to the fallback.
  """
  if wide_conv not in WIDE_CONVS:
    raise ValueError(f"kfac wide_conv={wide_conv!r}: choose one of {WIDE_CONVS}")
  fits = lambda s: not max_factor_dim or max(s.in_dim, s.out_dim) <= max_factor_dim
  out = {}
  for name, spec in layers.items():
    if not fits(spec) and spec.kind == "conv" and wide_conv == "channels":
      spec = dataclasses.replace(spec, factor="channels")
    if fits(spec):
      out[name] = spec
  return out


def _tagger(layers: dict[str, LayerSpec]):
  names = set(layers)

  def tag(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or "/".join(module.scope.path) not in names:
      return next_fun(*args, **kwargs)
    module.sow(INPUTS, "x", args[0])
    return module.perturb("y", next_fun(*args, **kwargs), collection=OUTPUTS)
  return tag


def tagged_forward(forward, layers: dict[str, LayerSpec], params, perturbations):
  """`forward` (see `sdl.optim.gradients`) that also returns each tagged layer's input
  `{name: x}` and the model's updated state collections.

  `perturbations` (from `zero_perturbations`) are added to the tagged layers' outputs, so
  the gradient with respect to them is the gradient with respect to those outputs.
  """
  with nn.intercept_methods(_tagger(layers)):
    out, cols = forward(params, {OUTPUTS: perturbations}, mutable=(INPUTS,))
  inputs = {"/".join(path[:-1]): x[0] for path, x in flatten_paths(cols[INPUTS]).items()}
  return out, (inputs, split_state(cols, (INPUTS, OUTPUTS)))


def zero_perturbations(forward, layers: dict[str, LayerSpec], params):
  with nn.intercept_methods(_tagger(layers)):
    shapes = jax.eval_shape(lambda: forward(params, None, mutable=(OUTPUTS,)))[1][OUTPUTS]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def module_forward(model: nn.Module, *args, **kwargs):
  """A `forward` for `model.apply(variables, *args, **kwargs)`, for tests and benchmarks
  that call K-FAC's pieces without the train step."""
  def forward(params, extra=None, mutable=()):
    out = model.apply({"params": params, **(extra or {})}, *args, mutable=list(mutable),
                      **kwargs)
    return out if mutable else (out, {})
  return forward


def flatten_paths(tree) -> dict[tuple[str, ...], Any]:
  """`{(key, ...): leaf}` of a nested dict (tuples of sown values are leaves)."""
  return {tuple(getattr(k, "key", k) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(
              tree, is_leaf=lambda x: isinstance(x, tuple))[0]}


def by_layer(perturbation_grads) -> dict[str, jax.Array]:
  """`{layer name: array}` of a tree shaped like the perturbations (one leaf a layer)."""
  return {"/".join(path[:-1]): g for path, g in flatten_paths(perturbation_grads).items()}


# ---- statistics ------------------------------------------------------------------------


def patches(x, spec: LayerSpec):
  """Input patches `[N, T, prod(k) * C]`, taps in row-major kernel order, channels last
  (the order of `kernel.reshape(-1, c_out)`)."""
  x = jnp.pad(x, ((0, 0), *spec.padding, (0, 0)))
  p = window_patches(x, spec.kernel_shape[:-2], spec.strides)
  return p.reshape(x.shape[0], -1, p.shape[-1])


def factor_rows(spec: LayerSpec, x, g):
  """The rows whose outer products make the factors, as `[examples, positions, width]`:
  the layer's inputs `a` (a conv's input patches; for the channel factor every tap of a
  patch is a position) and its per-example output gradients `g`. Depth is the leading
  spatial dimension, so an activation split over the batch and depth stays split over the
  first two dimensions (`Layout`)."""
  if spec.kind == "conv":
    a = patches(x, spec)
    if spec.factor == "channels":
      a = a.reshape(a.shape[0], -1, spec.kernel_shape[-2])
  else:
    a = x.reshape(x.shape[0], -1, x.shape[-1])
  return a, g.reshape(g.shape[0], -1, g.shape[-1])


def factor_sums(spec: LayerSpec, a, g):
  """`(Σ a aᵀ, Σ g gᵀ)` over the rows of `factor_rows`, with the bias's row and column."""
  hi = lax.Precision.HIGHEST
  a = a.reshape(-1, a.shape[-1]).astype(jnp.float32)
  g = g.reshape(-1, g.shape[-1]).astype(jnp.float32)
  sg = jnp.matmul(g.T, g, precision=hi)
  if spec.factor == "channels":
    sa = jnp.matmul(a.T, a, precision=hi)
    if spec.has_bias:  # block diagonal: the bias's entry is the mean of 1 · 1
      sa = jnp.pad(sa, ((0, 1), (0, 1))).at[-1, -1].set(a.shape[0])
    return sa, sg
  if spec.has_bias:
    a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
  return jnp.matmul(a.T, a, precision=hi), sg


def layer_factors(spec: LayerSpec, x, g):
  """Unreduced K-FAC sums for one layer: `(Σ a aᵀ, Σ g gᵀ, N·T, N)`.

  x: the layer input; g: per-example gradients of the loss w.r.t. the layer output.
  """
  a, g = factor_rows(spec, x, g)
  return (*factor_sums(spec, a, g), a.shape[0] * a.shape[1], x.shape[0])


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a GSPMD train step (one SPMD program, no `shard_map` around it: the hybrid data x
  spatial trainers) lays K-FAC's inputs over `mesh`: `batch`, the mesh axes that split the
  batch, and `spatial`, those that split the depth of activations.

  With it the transform enters `shard_map` over the mesh for its two collective parts
  itself. Statistics: each device sums the outer products of its own rows (its examples,
  its depth slab of positions; a layer whose depth does not divide over `spatial`, like the
  deep layers after pooling, is held whole by the spatial shards, which then each count
  1/size of it), then one `all_reduce_sum` over `batch + spatial`, hierarchical with a
  `node` axis. Inverses: split over every device of the mesh. The same program runs on
  one process or many: the mesh spans them all.
  """
  mesh: Any
  batch: tuple[str, ...]
  spatial: tuple[str, ...] = ()

  def __post_init__(self):
    unknown = [a for a in (*self.batch, *self.spatial) if a not in self.mesh.shape]
    if unknown or not self.batch:
      raise ValueError(f"kfac Layout(batch={self.batch}, spatial={self.spatial}): the batch "
                       f"needs at least one axis, and every axis must be one of the mesh's "
                       f"{tuple(self.mesh.axis_names)}")

  @property
  def axes(self) -> tuple[str, ...]:
    return (*self.batch, *self.spatial)

  def _size(self, axes) -> int:
    return math.prod(self.mesh.shape[a] for a in axes)

  def rows_spec(self, shape) -> P:
    """How `factor_rows`'s `[examples, positions, width]` are split: examples over `batch`,
    positions over `spatial`, each only where it divides."""
    split = lambda axes, n: axes if axes and n % self._size(axes) == 0 else None
    return P(split(self.batch, shape[0]), split(self.spatial, shape[1]), None)

  def copies(self, spec: P) -> int:
    """On how many devices of `axes` each row under `spec` lives."""
    used = {a for part in spec if part for a in ((part,) if isinstance(part, str) else part)}
    return self._size([a for a in self.axes if a not in used])


class LayerStats(NamedTuple):
  """What the train step hands the transform (optax extra argument `kfac_stats`)."""
  inputs: dict[str, jax.Array]              # layer name -> input
  output_grads: Callable[[], dict]          # -> per-example output gradients, computed on demand
  # layer name -> gradient of this step's (local, batch-mean) loss w.r.t. the layer output,
  # from which `∇W = Xᵀ Γ` (`grad_factors`); None: the transform only sees `grads`.
  loss_output_grads: dict[str, jax.Array] | None = None


class Phase(NamedTuple):
  """The periodic work of one update, fixed when the step is traced (optax extra argument
  `kfac_phase`): one compiled step per phase, and a plain step that neither tags the model
  nor carries the statistics and inversion branches. Without it the update decides on
  device from its step counter (`lax.cond`), one compiled step for all."""
  stats: bool    # re-estimate the factors
  inverse: bool  # re-invert them


def phase_at(step: int, stats_every: int, inverse_every: int) -> Phase:
  """The phase of update number `step` (counting from 0, as the transform's own counter)."""
  return Phase(step % stats_every == 0, step % inverse_every == 0)


# ---- collectives -----------------------------------------------------------------------


def assign_inverses(layers: dict[str, LayerSpec], devices: int) -> dict[str, int]:
  """Greedy longest-processing-time split of the layers' inversion work (`d³` per factor)."""
  load = [0] * devices
  owner = {}
  cost = {n: s.in_dim ** 3 + s.out_dim ** 3 for n, s in layers.items()}
  for name in sorted(cost, key=lambda n: (-cost[n], n)):
    owner[name] = int(np.argmin(load))
    load[owner[name]] += cost[name]
  return owner


# ---- the transform ---------------------------------------------------------------------


class KfacState(NamedTuple):
  count: jax.Array                    # updates seen
  stats_updates: jax.Array            # factor re-estimations so far
  factors: dict                       # name -> (A, G) in factor_dtype
  inverses: dict                      # name -> (damped A⁻¹, damped G⁻¹) fp32
  inverted_factors: dict              # name -> (A, G) at the last inversion (stale Fisher)
  inversions: dict                    # name -> int32 inversions of this layer
  diagonal: Any                       # fallback: EMA of g² per parameter (or None)
  previous: Any = None                # adaptive: the last step taken (or None)


def damped_inverse(m, damping, method):
  """`(m + damping I)⁻¹` in fp32, by `eigh` (negative eigenvalues clipped) or Cholesky."""
  m = m.astype(jnp.float32)
  eye = jnp.eye(m.shape[0], dtype=jnp.float32)
  if method == "eigh":
    w, q = jnp.linalg.eigh(m)
    return (q / (jnp.maximum(w, 0.0) + damping)) @ q.T
  chol = jax.scipy.linalg.cho_factor(m + damping * eye, lower=True)
  return jax.scipy.linalg.cho_solve(chol, eye)


def factored_damping(a, g, damping, pi_damping, relative=False):
  """(λ_A, λ_G) with λ_A λ_G = λ and, with π-damping, λ_A / λ_G = π².

  `relative`: λ_A λ_G = λ · (tr A / dim A)(tr G / dim G), so each layer is damped in
  proportion to its own mean curvature (with π-damping: λ_A = √λ tr A / dim A).
  """
  root = jnp.sqrt(jnp.asarray(damping, jnp.float32))
  ta = jnp.maximum(jnp.trace(a.astype(jnp.float32)) / a.shape[0], 1e-30)
  tg = jnp.maximum(jnp.trace(g.astype(jnp.float32)) / g.shape[0], 1e-30)
  scale = jnp.sqrt(ta * tg) if relative else 1.0
  if not pi_damping:
    return root * scale, root * scale
  pi = jnp.sqrt(ta / tg)
  return root * pi * scale, root / pi * scale


def gradient_factors(spec: LayerSpec, x, g):
  """The batch's gradient as a product, `∇[W; b] = Xᵀ Γ`: `(X, Γ)` with one row per
  position (N·T of them) — X `[P, d_in]` (bias column of ones appended), or `[P, taps, c]`
  for the channel factor (no bias column: its bias gradient is `Γ`'s column sums) — and
  Γ `[P, d_out]`, the loss's gradients w.r.t. the layer's outputs."""
  g = g.reshape(-1, g.shape[-1]).astype(jnp.float32)
  if spec.kind == "conv":
    x = patches(x, spec)
  x = x.reshape(g.shape[0], -1).astype(jnp.float32)
  if spec.factor == "channels":
    return x.reshape(g.shape[0], -1, spec.kernel_shape[-2]), g
  if spec.has_bias:
    x = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
  return x, g


def precondition_flops(spec: LayerSpec, positions: int | None = None) -> int:
  """Multiply-adds of `A⁻¹ ∇W G⁻¹` for one layer: from the gradient (`positions=None`,
  `d_in² d_out + d_in d_out²` whatever the batch), or from its factors over `positions`
  rows (`P (d_in² + d_in d_out + d_out²)`, `precondition_factored`)."""
  o = spec.out_dim
  if spec.factor == "channels":
    taps, c = math.prod(spec.kernel_shape[:-2]), spec.kernel_shape[-2]
    if positions is None:
      return taps * (c * c * o + c * o * o) + (o * o if spec.has_bias else 0)
    return positions * (taps * c * c + taps * c * o + o * o)
  d = spec.in_dim
  return d * d * o + d * o * o if positions is None else positions * (d * d + d * o + o * o)


def prefers_grad_factors(spec: LayerSpec, positions: int) -> bool:
  """Whether this layer's gradient over `positions` rows is cheaper to precondition from its
  factors (`precondition_factored`): by flops, with a margin of 2 for their thin products."""
  return 2 * precondition_flops(spec, positions) < precondition_flops(spec)


def precondition_factored(spec: LayerSpec, kernel, bias, x, g, a_inv, g_inv, scale=1.0):
  """`precondition` of the gradient `scale · Xᵀ Γ` (`gradient_factors`) without forming it:
  `(X A⁻¹)ᵀ (Γ G⁻¹)`, the same numbers in `P (d_in² + d_in d_out + d_out²)` multiply-adds.
  With few positions (the deep layers of a small batch: CosmoFlow's conv5 at 32³, batch 4,
  has 32) that is a fraction of the `d_in² d_out + d_in d_out²` of the product with the
  gradient (15 x fewer for conv5)."""
  hi = lax.Precision.HIGHEST
  right = jnp.matmul(g, g_inv, precision=hi) * scale
  if spec.factor == "channels":
    c = spec.kernel_shape[-2]
    left = jnp.einsum("ptc,cd->ptd", x, a_inv[:c, :c], precision=hi)
    u = jnp.einsum("ptd,po->tdo", left, right, precision=hi)
    u_bias = None if bias is None else a_inv[c, c] * jnp.sum(right, axis=0)
  else:
    u = jnp.matmul(jnp.matmul(x, a_inv, precision=hi).T, right, precision=hi)
    u_bias = None if bias is None else u[-1]
    u = u[:math.prod(spec.kernel_shape[:-1])]
  return (u.reshape(kernel.shape).astype(kernel.dtype),
          None if bias is None else u_bias.astype(bias.dtype))


def precondition(spec: LayerSpec, kernel, bias, a_inv, g_inv):
  """`A⁻¹ ∇[W; b] G⁻¹` for one layer, as (kernel update, bias update or None)."""
  hi = lax.Precision.HIGHEST
  if spec.factor == "channels":  # (I_taps ⊗ A_c)⁻¹: the same A_c⁻¹ on every tap
    c = spec.kernel_shape[-2]
    mat = kernel.reshape(-1, c, spec.out_dim).astype(jnp.float32)
    u = jnp.matmul(jnp.einsum("cd,tdo->tco", a_inv[:c, :c], mat, precision=hi), g_inv,
                   precision=hi)
    u_bias = None if bias is None else (
        a_inv[c, c] * jnp.matmul(bias.astype(jnp.float32), g_inv, precision=hi))
  else:
    mat = kernel.reshape(-1, spec.out_dim).astype(jnp.float32)
    if bias is not None:
      mat = jnp.concatenate([mat, bias.reshape(1, -1).astype(jnp.float32)], axis=0)
    u = jnp.matmul(jnp.matmul(a_inv, mat, precision=hi), g_inv, precision=hi)
    u_bias = None if bias is None else u[-1]
    u = u[:kernel.size // spec.out_dim]
  return (u.reshape(kernel.shape).astype(kernel.dtype),
          None if bias is None else u_bias.astype(bias.dtype))


def kfac(layers: dict[str, LayerSpec], *, damping: float = 1e-3, pi_damping: bool = True,
         relative_damping: bool = False, factor_decay: float = 0.95, stats_every: int = 1,
         inverse_every: int = 1,
         inversion: str = "eigh", stale_tolerance: float = 0.0, factor_dtype=jnp.float32,
         comm_dtype=jnp.float32, fallback: str = "identity", kl_clip: float = 0.0,
         learning_rate: float | Callable | None = None, norm_clip: float = 0.0,
         max_factor_dim: int = 0, wide_conv: str = "fallback", adaptive: bool = False,
         kl_clip_per_layer: bool = False, grad_factors: bool = True,
         axis_names: Sequence[str] = (),
         layout: Layout | None = None) -> optax.GradientTransformationExtraArgs:
  """The K-FAC preconditioner (module docstring). Chain it before momentum / lr scaling:
  `optax.chain(kfac(layers, ...), optax.sgd(schedule, momentum=0.9))`.

  `update(grads, state, params, kfac_stats=LayerStats(...), kfac_phase=None)`; `grads` are
  the already reduced (global) gradients, `kfac_stats` the local layer statistics (not
  needed when a static `kfac_phase` says this update takes none), `kfac_phase` a `Phase`
  fixed at trace time, which must be `phase_at(count, stats_every, inverse_every)`.

  Distributed, one of: `axis_names`, the batch axes of the `shard_map` the step runs in
  (`make_train_step(batch_axes=...)`), or `layout` (`Layout`), for a GSPMD step over a
  mesh, whose statistics and inverses the transform distributes itself.
  """
  if layout is not None and axis_names:
    raise ValueError("kfac: give axis_names (a step inside shard_map) or layout (a GSPMD "
                     "step over a mesh), not both")
  if inversion not in INVERSIONS:
    raise ValueError(f"kfac inversion={inversion!r}: choose one of {INVERSIONS}")
  if fallback not in FALLBACKS:
    raise ValueError(f"kfac fallback={fallback!r}: choose one of {FALLBACKS}")
  if adaptive and kl_clip:
    raise ValueError("kfac adaptive=True chooses the step size itself: set kl_clip=0")
  if kl_clip_per_layer and not kl_clip:
    raise ValueError("kfac kl_clip_per_layer=True splits kl_clip between modules: set kl_clip")
  if kl_clip and learning_rate is None:
    raise ValueError("kfac kl_clip needs learning_rate (the lr the update will be scaled by)")
  if min(stats_every, inverse_every) < 1:
    raise ValueError(f"kfac stats_every={stats_every}, inverse_every={inverse_every}: both ≥ 1")
  axis_names = tuple(axis_names)
  layers = select_layers(layers, max_factor_dim, wide_conv)
  if adaptive and learning_rate is None:
    learning_rate = 1.0
  lr = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def split_params(tree):
    """(layer name -> (kernel, bias or None), the rest with layer leaves set to None)."""
    flat = flatten_paths(tree)
    covered = {}
    for name, spec in layers.items():
      kernel = flat.get((*spec.path, "kernel"))
      if kernel is None:
        raise ValueError(f"kfac: layer {name} has no parameter {name}/kernel; was find_layers "
                         "run on this model?")
      covered[name] = (kernel, flat.get((*spec.path, "bias")) if spec.has_bias else None)
    return covered

  def is_layer_leaf(path) -> bool:
    return path[-1] in ("kernel", "bias") and "/".join(path[:-1]) in layers

  def factored_layers(stats: LayerStats | None) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Layer name -> this step's global `(X, Γ)` (`gradient_factors`) for the layers whose
    gradient is cheaper to precondition from them (`prefers_grad_factors`). The local rows
    are gathered over `axis_names`: there they are much smaller than ∇W. `Γ` is of the
    local loss; the caller scales by 1 / devices."""
    if not grad_factors or stats is None or stats.loss_output_grads is None:
      return {}
    out = {}
    for name, spec in layers.items():
      x, g = stats.inputs.get(name), stats.loss_output_grads.get(name)
      if x is None or g is None:
        continue
      if prefers_grad_factors(spec, math.prod(g.shape[:-1]) * device_count(axis_names)):
        x, g = gradient_factors(spec, x, g)
        if axis_names:
          x, g = (lax.all_gather(v, axis_names, tiled=True) for v in (x, g))
        out[name] = (x, g)
    return out

  def init(params):
    eye = lambda d: jnp.eye(d, dtype=jnp.float32)
    factors = {n: (eye(s.in_dim).astype(factor_dtype), eye(s.out_dim).astype(factor_dtype))
               for n, s in layers.items()}
    return KfacState(
        count=jnp.zeros((), jnp.int32), stats_updates=jnp.zeros((), jnp.int32),
        factors=factors,
        inverses={n: (eye(s.in_dim), eye(s.out_dim)) for n, s in layers.items()},
        # Own buffers, not aliases of `factors`: a donated state must not hold one twice.
        inverted_factors=jax.tree.map(jnp.copy, factors) if stale_tolerance else {},
        inversions={n: jnp.zeros((), jnp.int32) for n in layers},
        diagonal=(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
                  if fallback == "diagonal" else None),
        previous=(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
                  if adaptive else None))

  def new_factors(state, stats: LayerStats):
    grads_out = stats.output_grads()
    if layout is None:
      sums = {}
      for name, spec in layers.items():
        sa, sg, nt, n = layer_factors(spec, stats.inputs[name], grads_out[name])
        sums[name] = (sa, sg, jnp.float32(nt), jnp.float32(n))
      sums = all_reduce_sum(sums, axis_names, comm_dtype)
    else:
      sums = mesh_factor_sums({name: factor_rows(spec, stats.inputs[name], grads_out[name])
                               for name, spec in layers.items()},
                              {name: stats.inputs[name].shape[0] for name in layers})
    # A running mean until it would weigh a new estimate less than the EMA does: the
    # first estimate replaces the identity, the k-th counts 1/k, then 1 - factor_decay.
    weight = jnp.maximum(1 - factor_decay, 1 / (state.stats_updates + 1).astype(jnp.float32))
    out = {}
    for name, (sa, sg, nt, n) in sums.items():
      old_a, old_g = state.factors[name]
      batch = (sa / nt, sg / n)
      out[name] = tuple(((1 - weight) * old.astype(jnp.float32) + weight * new
                         ).astype(factor_dtype) for old, new in zip((old_a, old_g), batch))
    return out

  def mesh_factor_sums(rows: dict, examples: dict):
    """`new_factors`'s sums under `layout`: each device's own rows, then one all-reduce.
    The counts are the global arrays' (static)."""
    specs = {name: (layout.rows_spec(a.shape), layout.rows_spec(g.shape))
             for name, (a, g) in rows.items()}

    def local(rows):
      out = {}
      for name, (a, g) in rows.items():
        sa, sg = factor_sums(layers[name], a, g)
        out[name] = (sa / layout.copies(specs[name][0]), sg / layout.copies(specs[name][1]))
      return all_reduce_sum(out, layout.axes, comm_dtype)
    sums = jax.shard_map(local, mesh=layout.mesh, in_specs=(specs,), out_specs=P(),
                         check_vma=False)(rows)
    return {name: (sa, sg, jnp.float32(math.prod(rows[name][0].shape[:2])),
                   jnp.float32(examples[name])) for name, (sa, sg) in sums.items()}

  def refresh(state, factors):
    """Re-invert the layers whose factors moved (all of them without stale Fisher); under
    `layout`, split over every device of its mesh."""
    if layout is None:
      return refresh_on(axis_names, state.inverses, state.inversions, state.inverted_factors,
                        factors)
    axes = tuple(layout.mesh.axis_names)
    return jax.shard_map(lambda *a: refresh_on(axes, *a), mesh=layout.mesh,
                         in_specs=P(), out_specs=P(), check_vma=False)(
        state.inverses, state.inversions, state.inverted_factors, factors)

  def refresh_on(axes, old_inverses, old_inversions, old_inverted, factors):
    owner = assign_inverses(layers, device_count(axes))
    me = device_index(axes) if axes else 0
    inverses, inversions, inverted = {}, {}, {}
    for name in layers:
      a, g = factors[name]

      def invert(a=a, g=g):
        da, dg = factored_damping(a, g, damping, pi_damping, relative_damping)
        return damped_inverse(a, da, inversion), damped_inverse(g, dg, inversion)

      if stale_tolerance:
        last_a, last_g = old_inverted[name]
        moved = jnp.logical_or(_relative_change(a, last_a) > stale_tolerance,
                               _relative_change(g, last_g) > stale_tolerance)
        moved = jnp.logical_or(moved, old_inversions[name] == 0)
      else:
        moved = jnp.bool_(True)
      if axes:
        def shared(invert=invert, name=name):
          mine = lax.cond(me == owner[name], invert,
                          lambda: jax.tree.map(jnp.zeros_like, old_inverses[name]))
          return all_reduce_sum(mine, axes)
        compute = shared
      else:
        compute = invert
      inverses[name] = lax.cond(moved, compute, lambda name=name: old_inverses[name])
      inversions[name] = old_inversions[name] + moved.astype(jnp.int32)
      if stale_tolerance:
        inverted[name] = jax.tree.map(lambda new, old: jnp.where(moved, new, old),
                                      factors[name], old_inverted[name])
    return inverses, inversions, inverted

  def update(grads, state: KfacState, params=None, *, kfac_stats: LayerStats | None = None,
             kfac_phase: Phase | None = None, kfac_curvature: Callable | None = None,
             **unused):
    del params, unused
    if adaptive and kfac_curvature is None:
      raise ValueError("kfac adaptive=True needs kfac_curvature (from kfac.gradients)")
    if kfac_stats is None and (kfac_phase is None or kfac_phase.stats):
      raise ValueError("kfac.update needs kfac_stats=LayerStats(...): build the train step "
                       "with gradients=sdl.optim.kfac.gradients(...), or pass it as an optax "
                       "extra argument")
    keep = lambda: (state.inverses, state.inversions, state.inverted_factors)
    if kfac_phase is None:  # decided on device
      do_stats = state.count % stats_every == 0
      factors = lax.cond(do_stats, lambda: new_factors(state, kfac_stats),
                         lambda: state.factors)
    else:
      do_stats = jnp.bool_(kfac_phase.stats)
      factors = new_factors(state, kfac_stats) if kfac_phase.stats else state.factors
    stats_updates = state.stats_updates + do_stats.astype(jnp.int32)
    state = state._replace(factors=factors, stats_updates=stats_updates)
    if kfac_phase is None:
      inverses, inversions, inverted = lax.cond(state.count % inverse_every == 0,
                                                lambda: refresh(state, factors), keep)
    else:
      inverses, inversions, inverted = refresh(state, factors) if kfac_phase.inverse else keep()

    covered = split_params(grads)
    factored = factored_layers(kfac_stats)
    updates = {}
    for name, spec in layers.items():
      kernel, bias = covered[name]
      if name in factored:
        u_kernel, u_bias = precondition_factored(spec, kernel, bias, *factored[name],
                                                 *inverses[name], 1 / device_count(axis_names))
      else:
        u_kernel, u_bias = precondition(spec, kernel, bias, *inverses[name])
      updates[(*spec.path, "kernel")] = u_kernel
      if bias is not None:
        updates[(*spec.path, "bias")] = u_bias

    diagonal = state.diagonal
    if fallback == "diagonal":
      diagonal = jax.tree.map(lambda d, g: factor_decay * d + (1 - factor_decay) * jnp.square(
          g.astype(jnp.float32)), state.diagonal, grads)
      rest = jax.tree.map(lambda g, d: (g / (d + damping)).astype(g.dtype), grads, diagonal)
    else:
      rest = grads
    out = jax.tree_util.tree_map_with_path(
        lambda path, g: updates.get(_keys(path), g) if is_layer_leaf(_keys(path)) else g, rest)

    scale = jnp.float32(1.0)
    if kl_clip:
      step_lr = jnp.asarray(lr(state.count), jnp.float32)

      def kl_scale(keys, budget):  # ν = min(1, sqrt(budget / (lr² vᵀg))) over these leaves
        vg = sum(jnp.vdot(flat_out[k].astype(jnp.float32), flat_g[k].astype(jnp.float32))
                 for k in keys)
        return jnp.minimum(1.0, jnp.sqrt(budget / jnp.maximum(jnp.abs(vg) * step_lr ** 2,
                                                               1e-30)))
      flat_out, flat_g = flatten_paths(out), flatten_paths(grads)
      if kl_clip_per_layer:  # one share of the budget per module (path without its leaf)
        modules = {}
        for key in flat_out:
          modules.setdefault(key[:-1], []).append(key)
        scales = {k: nu for keys in modules.values()
                  for nu in [kl_scale(keys, kl_clip / len(modules))] for k in keys}
        out = jax.tree_util.tree_map_with_path(
            lambda path, u: (u * scales[_keys(path)]).astype(u.dtype), out)
      else:
        scale = kl_scale(list(flat_out), kl_clip)
    if norm_clip:
      scale = jnp.minimum(scale, norm_clip / jnp.maximum(_global_norm(out), 1e-30))
    out = jax.tree.map(lambda u: (u * scale).astype(u.dtype), out)
    previous = state.previous
    if adaptive:
      step = quadratic_model_step(out, state.previous, grads, kfac_curvature, damping)
      previous = jax.tree.map(lambda s: s * jnp.asarray(lr(state.count), jnp.float32), step)
      out = jax.tree.map(lambda s, g: (-s).astype(g.dtype), step, grads)
    return out, KfacState(state.count + 1, stats_updates, factors, inverses, inverted,
                          inversions, diagonal, previous)

  return optax.GradientTransformationExtraArgs(init, update)


def quadratic_model_step(direction, previous, grads, curvature: Callable, damping):
  """α Δ + μ δ minimising m(s) = gᵀs + ½ sᵀ(C + λ I)s (Martens & Grosse §7).

  `curvature([v1, v2])` is the 2 x 2 matrix of vᵢᵀ C vⱼ. With no previous step (all zero,
  the first update) μ is 0 and α = -gᵀΔ / Δᵀ(C + λ I)Δ.
  """
  f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  vecs = [f32(direction), f32(previous)]
  dot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a),
                                                        jax.tree.leaves(b)))
  m = curvature(vecs) + damping * jnp.stack([jnp.stack([dot(a, b) for b in vecs])
                                             for a in vecs])
  b = jnp.stack([dot(f32(grads), v) for v in vecs])
  first = m[1, 1] <= 0  # no previous step: solve [[m00, 0], [0, 1]] (α, μ) = -(b0, 0)
  m = jnp.where(first, jnp.diag(jnp.stack([m[0, 0], jnp.float32(1)])), m)
  b = jnp.where(first, b * jnp.array([1.0, 0.0], jnp.float32), b)
  coef = -jnp.linalg.solve(m, b)
  return jax.tree.map(lambda d, p: coef[0] * d + coef[1] * p, *vecs)


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _keys(path) -> tuple[str, ...]:
  return tuple(getattr(k, "key", k) for k in path)


def _relative_change(new, old):
  new, old = new.astype(jnp.float32), old.astype(jnp.float32)
  return jnp.linalg.norm(new - old) / jnp.maximum(jnp.linalg.norm(old), 1e-30)


# ---- the train step --------------------------------------------------------------------

LIKELIHOODS = ("gaussian", "categorical", "bernoulli")


def sample_output_grads(likelihood: str, outputs, rng):
  """Per-example gradients of `-log p(y|f)` at `y` drawn from the model (the true Fisher).

  gaussian: unit variance, loss ½‖f - y‖²; categorical: softmax logits; bernoulli: sigmoid
  logits. Each row is one example's gradient w.r.t. the outputs `f`.
  """
  f = outputs.astype(jnp.float32)
  if likelihood == "gaussian":
    return -jax.random.normal(rng, f.shape)
  if likelihood == "categorical":
    y = jax.random.categorical(rng, f)
    return jax.nn.softmax(f) - jax.nn.one_hot(y, f.shape[-1])
  if likelihood == "bernoulli":
    p = jax.nn.sigmoid(f)
    return p - jax.random.bernoulli(rng, p).astype(jnp.float32)
  raise ValueError(f"kfac likelihood={likelihood!r}: choose one of {LIKELIHOODS}")


def gradients(layers: dict[str, LayerSpec], *, fisher: str = "empirical",
              likelihood: str | None = None, axis_names: Sequence[str] = (),
              grad_factors: bool = True,
              transposable: Callable[[], contextlib.AbstractContextManager] =
              contextlib.nullcontext):
  """K-FAC's gradients function for the one train step (`sdl.optim.gradients`): the
  parameter gradients plus what the transform needs, as optax extra arguments
  (`kfac_stats`, `kfac_phase`, `kfac_curvature`).

  The step passes a static `phase` (a `Phase`, from `phase_at(step, ...)`; jit the step
  with `static_argnames="phase"`): steps without statistics then run the plain model, and
  none carries branches it does not take. On the CosmoFlow profile that made the amortised
  K-FAC step 1.6 -> 1.3 x SGD's (`experiments.kfac_profile`, docs/benchmarks.md).
  Under the step's `shard_map` (`make_train_step(..., batch_axes=...)`) `axis_names` must
  be those batch axes, as for `kfac(...)`.

  `fisher` sets where the output-gradient factors G come from: "empirical" (the loss's own
  gradients), "sampled" (one target drawn from the model's `likelihood`, the true Fisher)
  or "exact" (gaussian likelihood: one pullback per output, the Gauss-Newton factor with
  no sampling noise, for models with few outputs; CosmoFlow's 4 cost 3 more backward
  passes on statistics steps). `transposable()` is a context under which the model can be
  linearly transposed, for `kfac(adaptive=True)`'s curvature products: a caller whose
  model holds a custom call without a transpose rule passes a switch that turns it off
  (sdl's CPU convolution kernel: `sdl.kernels.conv3d.disabled`).
  """
  if fisher not in FISHERS:
    raise ValueError(f"kfac fisher={fisher!r}: choose one of {FISHERS}")
  if fisher == "sampled" and likelihood not in LIKELIHOODS:
    raise ValueError(f"kfac fisher='sampled' needs likelihood in {LIKELIHOODS}")
  if fisher == "exact" and likelihood != "gaussian":
    raise ValueError("kfac fisher='exact' is the Gauss-Newton matrix of a unit-variance "
                     f"gaussian likelihood: set likelihood='gaussian', not {likelihood!r}")
  axis_names = tuple(axis_names)

  def tagged(forward, loss_fn, params, rng, tagged=layers):
    perturbations = zero_perturbations(forward, tagged, params)
    outputs, pullback, (inputs, model_state) = jax.vjp(
        lambda p, e: tagged_forward(forward, tagged, p, e), params, perturbations,
        has_aux=True)
    (loss, metrics), d_outputs = jax.value_and_grad(loss_fn, has_aux=True)(outputs)
    grads, d_layer_outputs = pullback(d_outputs)
    n = outputs.shape[0]

    def output_grads():
      if fisher == "empirical":  # gradients of the mean loss, rescaled to one example's
        return jax.tree.map(lambda g: g * n, by_layer(d_layer_outputs))
      if fisher == "exact":
        # G = Σ_o E[g_o g_oᵀ], g_o pulled back from output o: the Gauss-Newton matrix
        # with H_f = I, exactly, with one pullback per output (no sampling noise). Rows of
        # all outputs stacked along the batch: `layer_factors` divides by the batch size.
        width = outputs.shape[-1]
        units = jnp.eye(width, dtype=outputs.dtype)
        per_output = [by_layer(pullback(jnp.broadcast_to(units[o], outputs.shape))[1])
                      for o in range(width)]
        return jax.tree.map(lambda *gs: jnp.concatenate(gs, axis=0), *per_output)
      sampled = sample_output_grads(likelihood, outputs, jax.random.fold_in(rng, 1))
      return by_layer(pullback(sampled.astype(outputs.dtype))[1])
    stats = LayerStats(inputs, output_grads, by_layer(d_layer_outputs))
    return loss, metrics, grads, model_state, stats

  def curvature(forward, loss_fn, params):
    """`vectors -> [vᵢᵀ C vⱼ]`, C the loss's Gauss-Newton matrix on this (global) batch;
    only traced if the transform asks for it (`kfac(adaptive=True)`)."""
    def gram(vectors):
      # J v as the transpose of the pullback v ↦ Jᵀv: reverse mode only, since models
      # may hold custom_vjp functions (sdl's CPU convolutions and pooling), which forward
      # mode cannot differentiate.
      with transposable():
        outputs, pullback = jax.vjp(lambda p: forward(p)[0], params)
      jvp = jax.linear_transpose(pullback, outputs)
      d_loss = jax.grad(lambda o: loss_fn(o)[0])
      jv = [jvp((jax.tree.map(lambda v, p: v.astype(p.dtype), v, params),))[0]
            for v in vectors]
      hjv = [jax.jvp(d_loss, (outputs,), (t,))[1] for t in jv]
      f32 = lambda x: x.astype(jnp.float32)
      m = jnp.stack([jnp.stack([jnp.vdot(f32(a), f32(b)) for b in hjv]) for a in jv])
      return lax.pmean(m, axis_names) if axis_names else m
    return gram

  def factored(forward, params) -> dict[str, LayerSpec]:
    """The layers whose gradients are cheaper to precondition from their factors
    (`kfac(grad_factors=True)`): few positions, so tagging them costs next to nothing."""
    if not grad_factors:
      return {}
    shapes = jax.eval_shape(lambda: zero_perturbations(forward, layers, params))
    return {name: layers[name] for name, y in by_layer(shapes).items()
            if prefers_grad_factors(layers[name],
                                    math.prod(y.shape[:-1]) * device_count(axis_names))}

  def compute(forward, loss_fn, params, *, rng, phase: Phase | None = None) -> Gradients:
    if phase is None or phase.stats:
      loss, metrics, grads, model_state, stats = tagged(forward, loss_fn, params, rng)
    elif few := factored(forward, params):  # a statistics-free step: only those layers
      loss, metrics, grads, model_state, stats = tagged(forward, loss_fn, params, rng, few)
    else:
      def plain_loss(p):
        outputs, mutated = forward(p)
        value, metrics = loss_fn(outputs)
        return value, (metrics, mutated)
      (loss, (metrics, mutated)), grads = jax.value_and_grad(plain_loss, has_aux=True)(params)
      model_state, stats = split_state(mutated), None
    return Gradients(loss, metrics, grads, model_state,
                     {"kfac_stats": stats, "kfac_phase": phase,
                      "kfac_curvature": curvature(forward, loss_fn, params)})
  return compute
