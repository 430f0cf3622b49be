"""Runnable versions of the benchmark problems, per implementation and precision.

`build(problem, impl, precision, backward)` returns `(fn, args)` ready for
`sdl.bench.timing.measure`, or None when the combination does not exist (NumPy has no
bf16 GEMM; the folded lowering is for 3D convolutions only; PyTorch not installed).

Implementations: `xla` (jax.numpy / lax, the native ops), `xla-folded` (3D convolutions
through sdl's depth-folded lowering, `sdl.models.conv`), `xla-blas` (fp32 GEMMs, and the
transformer's projections, on CPU through sdl's BLAS custom call, `sdl.kernels.gemm`),
`numpy` (NumPy's BLAS, GEMMs only, forward only), `torch` (PyTorch on CPU, fp32, when
installed: a reference; GEMMs forward only). Dense layers run as `xla`, `xla-blas` (the
product through `sdl.kernels.gemm.dot_general`) and `torch`.
Precisions: `highest` (fp32, `Precision.HIGHEST`), `default` (fp32 inputs at the
backend's default precision: TF32 on recent NVIDIA GPUs, bf16 passes on TPUs, fp32 on
CPUs) and `bf16` (bf16 inputs and outputs).
"""
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sdl.bench.problems import Conv, ConvTranspose, Dense, Gemm, Transformer
from sdl.bench.timing import measure
from sdl.kernels import gemm as sdl_gemm
from sdl.models import conv as sdl_conv

PRECISIONS = {"highest": (jnp.float32, lax.Precision.HIGHEST),
              "default": (jnp.float32, lax.Precision.DEFAULT),
              "bf16": (jnp.bfloat16, lax.Precision.DEFAULT)}
IMPLS = ("xla", "xla-folded", "xla-blas", "numpy", "torch")


def _random(shape, dtype, seed):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


def _gemm_operands(g: Gemm, dtype):
  a = _random((g.k, g.m) if g.a_t else (g.m, g.k), dtype, 0)
  b = _random((g.n, g.k) if g.b_t else (g.k, g.n), dtype, 1)
  return a, b


def _xla_gemm(g: Gemm, precision):
  def f(a, b):
    return jnp.matmul(a.T if g.a_t else a, b.T if g.b_t else b, precision=precision)
  return f


def _blas_gemm(g: Gemm):
  return lambda a, b: sdl_gemm.matmul(a, b, trans_a=g.a_t, trans_b=g.b_t, impl="blas")


def _blas_dense(v, w):
  """A projection through `sdl.kernels.gemm.dot_general` (BLAS where `use_blas` says)."""
  return sdl_gemm.dot_general(v, w, (((v.ndim - 1,), (0,)), ((), ())))


def _dense_operands(d: Dense, dtype):
  return (_random((d.batch, d.d_in), dtype, 0),
          (_random((d.d_in, d.d_out), dtype, 1) / math.sqrt(d.d_in),
           _random((d.d_out,), dtype, 2)))


def activation(name: str, slope: float = 0.01, ops=jax.nn):
  """The activation `name` from `ops` (`jax.nn`, or `torch.nn.functional`); GELU is the
  tanh approximation in both (jax.nn.gelu's default)."""
  if name == "none":
    return lambda v: v
  if name == "relu":
    return ops.relu
  if name == "leaky_relu":
    return lambda v: ops.leaky_relu(v, slope)
  if ops is jax.nn:
    return functools.partial(jax.nn.gelu, approximate=True)
  return functools.partial(ops.gelu, approximate="tanh")


def _xla_dense(d: Dense, product):
  act = activation(d.activation, d.slope)
  return lambda x, params: act(product(x, params[0]) + params[1])


def _conv_operands(c: Conv, dtype):
  return (_random((c.batch, *c.spatial, c.c_in), dtype, 0),
          _random((*c.kernel, c.c_in, c.c_out), dtype, 1) / math.sqrt(
              math.prod(c.kernel) * c.c_in))


def _xla_conv(c: Conv, precision, folded: bool):
  pad = [(p, p) for p in c.padding]
  if folded:
    return lambda x, w: sdl_conv.conv3d_folded(x, w, c.stride, pad)
  letters = "DHW"[-len(c.spatial):]
  dims = (f"N{letters}C", f"{letters}IO", f"N{letters}C")
  return lambda x, w: lax.conv_general_dilated(x, w, c.stride, pad, dimension_numbers=dims,
                                               precision=precision)


def _conv_transpose_operands(c: ConvTranspose, dtype):
  return (_random((c.batch, *c.spatial, c.c_in), dtype, 0),
          _random((c.k,) * 3 + (c.c_in, c.c_out), dtype, 1) / math.sqrt(c.c_in))


def _xla_conv_transpose(c: ConvTranspose, precision, folded: bool):
  if folded:  # sdl's CPU lowering: one GEMM and a depth-to-space reshuffle
    return sdl_conv.depth_to_space
  return lambda x, w: lax.conv_transpose(x, w, (c.k,) * 3, "VALID", precision=precision,
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def transformer_params(t: Transformer, dtype):
  d, f = t.width, t.mlp
  shapes = {"qkv": (d, 3 * d), "out": (d, d), "up": (d, f), "down": (f, d)}
  return {k: _random(v, dtype, i) / math.sqrt(v[0]) for i, (k, v) in enumerate(shapes.items())}


def transformer_block(t: Transformer, precision, x, params, dense=None):
  """Pre-LN block: x + attn(LN(x)), then + MLP(LN(.)) (GELU); `[batch, seq, width]`.

  `dense(v, w)` runs the four projections (default: `jnp.matmul` at `precision`).
  """
  mm = functools.partial(jnp.matmul, precision=precision)
  dense = dense or mm
  b, s, d = x.shape
  heads = t.heads

  def norm(v):
    v32 = v.astype(jnp.float32)
    return ((v32 - v32.mean(-1, keepdims=True)) * lax.rsqrt(v32.var(-1, keepdims=True) + 1e-6)
            ).astype(v.dtype)
  q, k, v = jnp.split(dense(norm(x), params["qkv"]), 3, axis=-1)
  split = lambda z: z.reshape(b, s, heads, d // heads).transpose(0, 2, 1, 3)
  q, k, v = split(q), split(k), split(v)
  scores = mm(q, k.transpose(0, 1, 3, 2)) / math.sqrt(d // heads)
  attn = mm(jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype), v)
  x = x + dense(attn.transpose(0, 2, 1, 3).reshape(b, s, d), params["out"])
  if t.attention_only:
    return x
  return x + dense(jax.nn.gelu(dense(norm(x), params["up"])), params["down"])


def _torch(problem, backward: bool):
  try:
    import torch  # noqa: PLC0415 (optional reference)
  except ImportError:
    return None
  torch.set_num_threads(max(1, os.cpu_count() or 1))
  if isinstance(problem, Gemm):
    a = torch.randn(*((problem.k, problem.m) if problem.a_t else (problem.m, problem.k)))
    b = torch.randn(*((problem.n, problem.k) if problem.b_t else (problem.k, problem.n)))
    if backward:
      return None
    return (lambda a, b: (a.T if problem.a_t else a) @ (b.T if problem.b_t else b)), (a, b)
  if isinstance(problem, Dense):
    act = activation(problem.activation, problem.slope, torch.nn.functional)
    x = torch.randn(problem.batch, problem.d_in, requires_grad=backward)
    w = torch.randn(problem.d_out, problem.d_in, requires_grad=backward)
    b = torch.randn(problem.d_out, requires_grad=backward)

    def dense(x, w, b):
      y = act(torch.nn.functional.linear(x, w, b))
      if backward:
        y.sum().backward()
      return y
    return dense, (x, w, b)
  if isinstance(problem, Conv):
    nd = len(problem.spatial)
    fn = {2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[nd]
    x = torch.randn(problem.batch, problem.c_in, *problem.spatial, requires_grad=backward)
    w = torch.randn(problem.c_out, problem.c_in, *problem.kernel, requires_grad=backward)

    def f(x, w):
      y = fn(x, w, stride=problem.stride, padding=problem.padding)
      if backward:
        y.sum().backward()
      return y
    return f, (x, w)
  if isinstance(problem, ConvTranspose):
    x = torch.randn(problem.batch, problem.c_in, *problem.spatial, requires_grad=backward)
    w = torch.randn(problem.c_in, problem.c_out, *(problem.k,) * 3, requires_grad=backward)

    def f(x, w):
      y = torch.nn.functional.conv_transpose3d(x, w, stride=problem.k)
      if backward:
        y.sum().backward()
      return y
    return f, (x, w)
  return None


def build(problem, impl: str, precision: str, backward: bool):
  """`(fn, args)` for one benchmark cell, or None if it does not exist."""
  dtype, prec = PRECISIONS[precision]
  if impl == "torch":
    return _torch(problem, backward) if precision == "highest" else None
  if impl == "numpy":
    if not isinstance(problem, Gemm) or backward or precision == "bf16":
      return None
    a, b = (np.asarray(x) for x in _gemm_operands(problem, np.float32))
    return (lambda a, b: (a.T if problem.a_t else a) @ (b.T if problem.b_t else b)), (a, b)
  if impl == "xla-blas":
    if (isinstance(problem, (Conv, ConvTranspose)) or precision != "highest"
        or jax.default_backend() != "cpu" or not sdl_gemm.available()):
      return None
    if isinstance(problem, Gemm):
      f, args = _blas_gemm(problem), _gemm_operands(problem, dtype)
    elif isinstance(problem, Dense):
      f, args = _xla_dense(problem, _blas_dense), _dense_operands(problem, dtype)
    else:
      x = _random((problem.batch, problem.seq, problem.width), dtype, 2)
      f = lambda x, params: transformer_block(problem, prec, x, params, _blas_dense)  # noqa: E731
      args = (x, transformer_params(problem, dtype))
    return _jitted(f, args, backward)
  folded = impl == "xla-folded"
  if isinstance(problem, Gemm) and not folded:
    f, args = _xla_gemm(problem, prec), _gemm_operands(problem, dtype)
  elif isinstance(problem, Dense) and not folded:
    product = functools.partial(jnp.matmul, precision=prec)
    f, args = _xla_dense(problem, product), _dense_operands(problem, dtype)
  elif isinstance(problem, Conv) and (not folded or len(problem.spatial) == 3):
    f, args = _xla_conv(problem, prec, folded), _conv_operands(problem, dtype)
  elif isinstance(problem, ConvTranspose):
    f, args = _xla_conv_transpose(problem, prec, folded), _conv_transpose_operands(problem, dtype)
  elif isinstance(problem, Transformer) and not folded:
    x = _random((problem.batch, problem.seq, problem.width), dtype, 2)
    f = lambda x, params: transformer_block(problem, prec, x, params)  # noqa: E731
    args = (x, transformer_params(problem, dtype))
  else:
    return None
  return _jitted(f, args, backward)


def _jitted(f, args, backward: bool):
  if backward:
    g = jax.value_and_grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1))
    return jax.jit(g), args
  return jax.jit(f), args


def xla_cost(fn, args) -> dict:
  """XLA's own count (`flops`, `bytes accessed`) for a jitted fn, {} if unavailable, plus
  `custom_calls`: how many custom calls the compiled program makes. XLA counts nothing
  inside one (sdl's direct convolution and BLAS kernels), so where there are any its
  count is no check of ours."""
  try:
    compiled = fn.lower(*args).compile()
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 (cost analysis is best effort by design)
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  out = dict(cost or {})
  try:
    out["custom_calls"] = compiled.as_text().count(" custom-call(")
  except Exception:  # noqa: BLE001 (the HLO text is best effort too)
    pass
  return out


def copy_bandwidth(nbytes: int = 512 << 20, runs: int = 10) -> float:
  """Bytes/s of a large on-device copy (read + write counted): the memory roof."""
  x = jnp.ones(nbytes // 4, jnp.float32)
  copy = jax.jit(lambda x: x * 1.0000001)  # a streaming read + write XLA cannot elide
  return 2 * nbytes / measure(copy, x, runs=runs).median_s
