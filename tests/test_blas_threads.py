"""`sdl.process.configure()` sets scipy's own BLAS (the LAPACK jaxlib calls on CPU) to one thread, leaves NumPy's
BLAS alone, and leaves both alone where the user set a thread count; OpenBLAS's idle
threads sleep at once when it runs before NumPy loads."""
import json
import os
import subprocess
import sys

import numpy as np

# BLAS threads before and after `import sdl`, and a Cholesky inverse computed through it.
REPORT = """
import json, threadpoolctl, scipy.linalg
blas = lambda: {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"}
before = blas()
from sdl import process
process.configure()
import jax.numpy as jnp, jax.scipy.linalg as sl
from sdl import blas_threads
m = jnp.eye(3) * 4.0
inverse = sl.cho_solve(sl.cho_factor(m, lower=True), jnp.eye(3))
print(json.dumps({"before": before, "after": blas(), "inverse": inverse[0, :2].tolist(),
                  "scipy_owned": [c.filepath for c in blas_threads.scipy_blas_controllers()]}))
"""


def report(**env):
  clean = {k: v for k, v in os.environ.items()
           if k not in ("SDL_LAPACK_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
  out = subprocess.run([sys.executable, "-c", REPORT], capture_output=True, text=True,
                       env={**clean, **env}, timeout=120, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_scipy_blas_gets_one_thread_and_numpy_keeps_its_own():
  r = report()
  np.testing.assert_allclose(r["inverse"], [0.25, 0.0])  # LAPACK still gives the answer
  owned = set(r["scipy_owned"])
  for path, threads in r["after"].items():
    assert threads == (1 if path in owned else r["before"][path]), path
  if sys.platform == "linux" and os.cpu_count() > 1:
    # pip's scipy wheels ship their own OpenBLAS, which starts with every core
    assert owned and all(r["before"][p] > 1 for p in owned)


def test_user_settings_win():
  from sdl import blas_threads
  r = report(SDL_LAPACK_THREADS="2")
  assert {r["after"][p] for p in r["scipy_owned"]} <= {2}
  r = report(OPENBLAS_NUM_THREADS="2")
  assert r["after"] == r["before"]
  assert blas_threads.limit({"OMP_NUM_THREADS": "3"}) == []


def test_idle_threads_quieted_only_before_numpy_loads_and_never_over_the_user():
  from sdl import blas_threads
  env = {}
  assert blas_threads.quiet_idle_threads(env, modules={}) and env == {
      "OPENBLAS_THREAD_TIMEOUT": "4"}
  env = {}
  assert not blas_threads.quiet_idle_threads(env, modules={"numpy": None}) and env == {}
  env = {"OPENBLAS_THREAD_TIMEOUT": "10"}
  assert blas_threads.quiet_idle_threads(env, modules={"numpy": None})
  assert env == {"OPENBLAS_THREAD_TIMEOUT": "10"}


def test_entry_points_import_sdl_before_numpy():
  """`python -m experiments.X` imports the experiments package first, which configures the
  process before anything loads NumPy's OpenBLAS."""
  code = ("import sys, experiments, os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'), "
          "experiments.PROCESS_SETTINGS['openblas_idle'])")
  clean = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=clean, timeout=120, check=True)
  assert out.stdout.split() == ["4", "True"]
