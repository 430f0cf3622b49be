"""sdl.kernels.gemm: fp32 GEMMs through BLAS, against numpy in float64 and XLA's dot."""
import glob
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from sdl.kernels import build, gemm

TRANSPOSES = [(False, False), (True, False), (False, True), (True, True)]


def operands(m, n, k, trans_a, trans_b, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
  b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
  return a, b


def op(x, transposed):
  return x.T if transposed else x


@pytest.mark.parametrize("trans_a,trans_b", TRANSPOSES)
def test_matmul_and_gradients_match_float64_numpy(trans_a, trans_b):
  m, n, k = 37, 23, 51
  a, b = operands(m, n, k, trans_a, trans_b)
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  c64 = op(a64, trans_a) @ op(b64, trans_b)

  def loss(a, b):
    return jnp.sum(jnp.sin(gemm.matmul(a, b, trans_a=trans_a, trans_b=trans_b, impl="blas")))
  c = jax.jit(lambda a, b: gemm.matmul(a, b, trans_a=trans_a, trans_b=trans_b,
                                       impl="blas"))(a, b)
  np.testing.assert_allclose(np.asarray(c), c64, rtol=1e-5, atol=1e-5)
  # d op(A) = G op(B)ᵀ, d op(B) = op(A)ᵀ G with G = cos(C), then undo the transposes
  g = np.cos(c64)
  da, db = g @ op(b64, trans_b).T, op(a64, trans_a).T @ g
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)
  np.testing.assert_allclose(np.asarray(grads[0]), op(da, trans_a), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(grads[1]), op(db, trans_b), rtol=1e-4, atol=1e-4)
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(a, b).as_text()
  assert hlo.count(gemm.TARGET) == 3  # forward and both gradients went to BLAS


def test_dense_layer_with_blas_dot_general_equals_xla(monkeypatch):
  monkeypatch.setattr(gemm, "MIN_MACS", 0)  # send even this small layer to BLAS
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 16))
  plain, blas = nn.Dense(8), nn.Dense(8, dot_general=gemm.dot_general)
  params = plain.init(jax.random.PRNGKey(1), x)

  def loss(module, params, x):
    return jnp.sum(jnp.tanh(module.apply(params, x)))
  with jax.default_matmul_precision("highest"):
    want = jax.value_and_grad(loss, argnums=(1, 2))(plain, params, x)
  got = jax.jit(jax.value_and_grad(loss, argnums=(1, 2)), static_argnums=0)(blas, params, x)
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
  assert gemm.TARGET in jax.jit(lambda p, x: blas.apply(p, x)).lower(params, x).as_text()


def test_dot_general_leaves_what_blas_cannot_do_to_xla(monkeypatch):
  monkeypatch.setattr(gemm, "MIN_MACS", 0)
  x = jnp.ones((2, 4, 6))
  batched = (((2,), (1,)), ((0,), (0,)))  # a batch dimension: not a plain GEMM
  f = lambda x, y: gemm.dot_general(x, y, batched)  # noqa: E731
  assert gemm.TARGET not in jax.jit(f).lower(x, jnp.ones((2, 6, 3))).as_text()
  bf16 = lambda x, y: gemm.dot_general(x, y, (((2,), (0,)), ((), ())))  # noqa: E731
  lowered = jax.jit(bf16).lower(x.astype(jnp.bfloat16), jnp.ones((6, 3), jnp.bfloat16))
  assert gemm.TARGET not in lowered.as_text()


def test_use_blas_policy():
  big = 1 << 10
  assert gemm.use_blas(big, big, big, jnp.float32, backend="cpu")
  assert not gemm.use_blas(big, big, big, jnp.float32, backend="gpu")
  assert not gemm.use_blas(big, big, big, jnp.bfloat16, backend="cpu")
  assert not gemm.use_blas(8, 8, 8, jnp.float32, backend="cpu")
  with pytest.raises(ValueError, match="impl"):
    gemm.matmul(jnp.ones((2, 2)), jnp.ones((2, 2)), impl="cublas")


def test_sharded_matmul_equals_one_device():
  """Inside shard_map on row blocks, and replicated by GSPMD: both equal one device."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  a, b = operands(64, 24, 40, False, False, seed=3)
  one = np.asarray(jax.jit(lambda a, b: gemm.matmul(a, b, impl="blas"))(a, b))
  sharded_a = jax.device_put(a, NamedSharding(mesh, P("data", None)))
  local = jax.jit(jax.shard_map(lambda a, b: gemm.matmul(a, b, impl="blas"), mesh=mesh,
                                in_specs=(P("data"), P()), out_specs=P("data")))
  out = local(sharded_a, b)
  assert out.sharding.spec == P("data", None)
  np.testing.assert_allclose(np.asarray(out), one, rtol=1e-5, atol=1e-5)
  replicated = jax.jit(lambda a, b: gemm.matmul(a, b, impl="blas"))(sharded_a, b)
  np.testing.assert_allclose(np.asarray(replicated), one, rtol=1e-5, atol=1e-5)


def test_sdl_blas_settings(tmp_path):
  assert gemm.parse_blas("off") is None
  with pytest.raises(gemm.BlasError, match="no file"):
    gemm.parse_blas(str(tmp_path / "libnothing.so"))
  numpy_lib = gemm.numpy_blas()
  assert os.path.exists(numpy_lib.path)
  with pytest.raises(gemm.BlasError, match="no symbol 'not_a_gemm'"):
    gemm.parse_blas(f"{numpy_lib.path}:not_a_gemm")
  with pytest.raises(gemm.BlasError, match="'ilp64' or 'lp64'"):
    gemm.parse_blas(f"{numpy_lib.path}:{numpy_lib.symbol}:int128")
  assert gemm.parse_blas(f"{numpy_lib.path}:{numpy_lib.symbol}") == numpy_lib


def test_build_caches_the_library_and_names_compiler_failures(tmp_path, monkeypatch):
  monkeypatch.setenv("SDL_KERNEL_CACHE", str(tmp_path))
  first = build.library("gemm.cc")
  assert first.parent == tmp_path and first.exists()
  stamp = first.stat().st_mtime_ns
  assert build.library("gemm.cc") == first and first.stat().st_mtime_ns == stamp
  monkeypatch.setenv("SDL_KERNEL_CACHE", str(tmp_path / "other"))
  monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
  with pytest.raises(build.KernelBuildError, match="gemm.cc failed"):
    build.library("gemm.cc")
  assert not list((tmp_path / "other").glob("*.tmp"))  # nothing half-written left
  (tmp_path / "a_file").write_text("")
  monkeypatch.setenv("SDL_KERNEL_CACHE", str(tmp_path / "a_file" / "cache"))
  monkeypatch.delenv("CXX")
  with pytest.raises(build.KernelBuildError, match="SDL_KERNEL_CACHE"):
    build.library("gemm.cc")


LP64_CHECK = """
import glob, json, os, numpy as np, scipy, jax
from sdl.kernels import gemm
rng = np.random.default_rng(0)
a, b = rng.standard_normal((12, 9), np.float32), rng.standard_normal((9, 5), np.float32)
f = jax.jit(lambda a, b: (gemm.matmul(a, b, impl="blas"),
                          gemm.matmul(b, a, trans_a=True, trans_b=True, impl="blas")))
ab, ba = (np.asarray(x) for x in f(a, b))
a64, b64 = a.astype(np.float64), b.astype(np.float64)
blas = gemm.setup()
print(json.dumps({"symbol": blas.symbol, "ilp64": blas.ilp64,
                  "error": max(float(np.abs(ab - a64 @ b64).max()),
                               float(np.abs(ba - b64.T @ a64.T).max()))}))
"""


def test_a_32_bit_integer_blas_chosen_by_sdl_blas():
  """NumPy's OpenBLAS takes 64-bit integers; scipy's wheel ships one with 32-bit integers
  (`scipy_cblas_sgemm`), which exercises the kernel's other calling convention."""
  import scipy  # noqa: PLC0415
  libs = sorted(glob.glob(os.path.join(os.path.dirname(scipy.__file__) + ".libs",
                                       "libscipy_openblas*.so")))
  found = [b for b in map(gemm._find_symbol, libs) if b and not b.ilp64]
  assert found, f"no 32-bit-integer cblas_sgemm among {libs}"
  out = subprocess.run([sys.executable, "-c", LP64_CHECK], capture_output=True, text=True,
                       env={**os.environ, "SDL_BLAS": found[0].path}, timeout=300,
                       check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["ilp64"] is False and result["symbol"] == found[0].symbol
  assert result["error"] < 1e-4


WRONG_BLAS = """
#include <stdint.h>
#ifdef __cplusplus
extern "C"
#endif
void cblas_sgemm(int order, int ta, int tb, int32_t m, int32_t n, int32_t k, float alpha,
                 const float *a, int32_t lda, const float *b, int32_t ldb, float beta,
                 float *c, int32_t ldc) {
  for (int32_t i = 0; i < m; ++i)
    for (int32_t j = 0; j < n; ++j) c[i * ldc + j] = 1.0f;  /* not a product */
}
"""
SETUP = """
from sdl.kernels import gemm
try:
  gemm.setup()
except gemm.BlasError as error:
  print("BlasError:", error)
print("available:", gemm.available())
"""


def test_setup_checks_the_blas_before_using_it(tmp_path):
  """A library whose cblas_sgemm gives wrong numbers is refused at set-up, by name."""
  source = tmp_path / "wrong.c"
  source.write_text(WRONG_BLAS)
  library = tmp_path / "libwrong.so"
  subprocess.run([build.compiler(), "-shared", "-fPIC", str(source), "-o", str(library)],
                 check=True)
  out = subprocess.run([sys.executable, "-c", SETUP], capture_output=True, text=True,
                       env={**os.environ, "SDL_BLAS": str(library)}, timeout=300, check=True)
  assert f"BlasError: cblas_sgemm in {library} gave wrong results" in out.stdout
  assert "available: False" in out.stdout
