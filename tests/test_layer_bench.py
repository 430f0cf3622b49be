"""The per-layer benchmark: counts agree with XLA's, timing is sane, outputs are written."""
import csv
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cosmoflow_step_bench as step_bench
from experiments.configs import layer_bench as configs
from sdl.bench import layers, problems, roofline, suite, timing
from sdl.bench.timing import measure, measure_interleaved
from sdl.models.cosmoflow import CosmoFlow


def test_problem_lists_cover_the_issue():
  assert len(problems.deepbench_gemms()) >= 20
  assert len(problems.deepbench_convs()) >= 10
  mlperf = problems.cosmoflow_convs("mlperf", 128)
  assert [c.c_out for c in mlperf] == [32, 64, 128, 256, 512]
  assert [c.spatial[0] for c in mlperf] == [128, 64, 32, 16, 8]
  lbann = problems.cosmoflow_convs("lbann", 128)
  assert [c.stride[0] for c in lbann] == [1, 1, 1, 2, 1, 1, 1]
  dense = problems.dense_layers(128)
  assert [(d.d_in, d.d_out) for d in dense[:3]] == [(512 * 4 ** 3, 128), (128, 64), (64, 4)]
  assert [d.activation for d in dense[:3]] == ["leaky_relu", "leaky_relu", "none"]
  assert len(dense) == 10 and all(d.flops() == 2 * d.batch * d.d_in * d.d_out for d in dense)
  assert [d.source for d in problems.dense_layers(16)][0] == "cosmoflow-lbann"  # no 16³ mlperf
  unet = problems.unet3d_convs(64)
  assert unet[0].c_in == 1 and unet[-1].c_out == 32 and unet[-2].c_in == 64 + 32
  ups = problems.unet3d_transposed_convs(64)  # LBANN's: bottom's 512 channels up first
  assert [(u.spatial[0], u.c_in, u.c_out, u.out_spatial[0]) for u in ups] == [
      (8, 512, 512, 16), (16, 256, 256, 32), (32, 128, 128, 64)]
  p = configs.get_config("cpu").problems
  p.only = "lbann n2 4x4x4x128->256"  # one row of the suite, rerun alone
  assert [x.name for x in suite.problem_list(p)] == [lbann[4].name]
  p.only = "no such layer"
  with pytest.raises(ValueError, match="problems.only='no such layer' matches no problem"):
    suite.problem_list(p)


@pytest.mark.parametrize("problem", [
    problems.Gemm(64, 48, 32), problems.Gemm(64, 48, 32, a_t=True),
    problems.deepbench_convs()[4],                       # strided 3x3, padded
    problems.Conv(1, (9, 10, 8), 3, 5, (3, 3, 3), (2, 1, 1), (1, 0, 1), "t"),
    problems.ConvTranspose(2, (3, 4, 5), 6, 7, 2, "t"),
])
def test_analytic_flops_equal_xla_cost_analysis(problem):
  fn, args = layers.build(problem, "xla", "highest", backward=False)
  out = fn(*args)
  if isinstance(problem, (problems.Conv, problems.ConvTranspose)):
    assert out.shape[1:-1] == problem.out_spatial  # our output-size formula
  xla = layers.xla_cost(fn, args)["flops"]
  if isinstance(problem, (problems.Gemm, problems.ConvTranspose)):
    assert xla == problem.flops()
  else:  # XLA leaves out the taps on zero padding; our exact count of those agrees
    assert xla == pytest.approx(problem.valid_flops(), rel=1e-9)
    assert problem.valid_flops() <= problem.flops()


def test_dense_layers_match_numpy_and_pytorch_and_xlas_count():
  """act(x W + b) through XLA and through the BLAS path against float64 numpy, forward and
  gradients; PyTorch's version of the same layer against numpy too (when installed)."""
  np_act = {"relu": lambda v: np.maximum(v, 0),
            "leaky_relu": lambda v: np.where(v > 0, v, 0.3 * v),
            "gelu": lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3))),
            "none": lambda v: v}
  for act in problems.ACTIVATIONS:
    d = problems.Dense(6, 40, 24, act, "t", slope=0.3)
    (fx, (x, (w, b))), (fb, ab) = (layers.build(d, i, "highest", False)
                                   for i in ("xla", "xla-blas"))
    want = np_act[act](np.float64(x) @ np.float64(w) + np.float64(b))
    np.testing.assert_allclose(np.asarray(fx(x, (w, b))), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fb(*ab)), want, rtol=1e-5, atol=1e-5)
    (gx, args), (gb, _) = (layers.build(d, i, "highest", True) for i in ("xla", "xla-blas"))
    for u, v in zip(jax.tree.leaves(gx(*args)), jax.tree.leaves(gb(*args))):
      np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-4)
    torch_cell = layers.build(d, "torch", "highest", False)
    if torch_cell is not None:
      f, (tx, tw, tb) = torch_cell
      want = np_act[act](tx.double().numpy() @ tw.double().numpy().T + tb.double().numpy())
      np.testing.assert_allclose(f(tx, tw, tb).detach().numpy(), want, rtol=1e-4, atol=1e-4)
  wide = problems.Dense(8, 512, 256, "relu", "t")
  fn, args = layers.build(wide, "xla", "highest", False)
  # XLA also counts the bias add and the ReLU: 2 x 8 x 256 more, 0.2 % of the product
  assert layers.xla_cost(fn, args)["flops"] == pytest.approx(wide.flops(), rel=0.01)
  with pytest.raises(ValueError, match="activation 'tanh'"):
    problems.Dense(1, 2, 3, "tanh", "t")


def test_transformer_flops_within_a_few_percent_of_xla():
  t = problems.Transformer(1, 64, 64, 4, 256)
  fn, args = layers.build(t, "xla", "highest", backward=False)
  # XLA also counts softmax, layer norms and GELU, which the matmul count leaves out.
  assert layers.xla_cost(fn, args)["flops"] == pytest.approx(t.flops(), rel=0.1)
  a = problems.Transformer(1, 64, 64, 4, 256, attention_only=True)
  assert a.flops() < t.flops()


def test_implementations_agree_numerically():
  g = problems.Gemm(96, 40, 72, b_t=True)
  (fx, ax), (fn, an) = (layers.build(g, i, "highest", False) for i in ("xla", "numpy"))
  np.testing.assert_allclose(np.asarray(fx(*ax)), fn(*an), rtol=1e-4, atol=1e-4)
  (fb, ab), (gx, _) = (layers.build(g, i, "highest", True) for i in ("xla-blas", "xla"))
  for blas, xla in zip(jax.tree.leaves(fb(*ab)), jax.tree.leaves(gx(*ab))):
    np.testing.assert_allclose(np.asarray(blas), np.asarray(xla), rtol=1e-4, atol=1e-4)
  assert layers.build(g, "xla-blas", "bf16", False) is None
  t = problems.Transformer(1, 64, 64, 4, 256)
  (fx, ax), (fb, ab) = (layers.build(t, i, "highest", False) for i in ("xla", "xla-blas"))
  np.testing.assert_allclose(np.asarray(fb(*ab)), np.asarray(fx(*ax)), rtol=1e-4, atol=1e-4)
  assert "sdl_gemm_f32" in fb.lower(*ab).as_text()  # 64 x 64 x 256 projections: to BLAS
  c = problems.cosmoflow_convs("lbann", 16)[3]  # the strided conv
  (fx, ax), (ff, af) = (layers.build(c, i, "highest", False) for i in ("xla", "xla-folded"))
  np.testing.assert_allclose(np.asarray(fx(*ax)), np.asarray(ff(*af)), rtol=1e-4, atol=1e-4)
  assert layers.build(problems.deepbench_convs()[0], "xla-folded", "highest", False) is None
  up = problems.ConvTranspose(1, (2, 3, 4), 8, 6, 2, "t")  # native, depth_to_space, PyTorch
  (fx, ax), (ff, af) = (layers.build(up, i, "highest", False) for i in ("xla", "xla-folded"))
  np.testing.assert_allclose(np.asarray(ff(*af)), np.asarray(fx(*ax)), rtol=1e-5, atol=1e-5)
  torch_cell = layers.build(up, "torch", "highest", False)
  if torch_cell is not None:  # PyTorch's NCDHW and [C, O, k, k, k] on the same numbers
    import torch  # noqa: PLC0415
    f, _ = torch_cell
    x, w = (np.asarray(v) for v in ax)
    # lax.conv_transpose without transpose_kernel meets tap k-1-a at offset a (flipped)
    y = f(torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()),
          torch.from_numpy(w[::-1, ::-1, ::-1].transpose(3, 4, 0, 1, 2).copy())).numpy()
    np.testing.assert_allclose(y.transpose(0, 2, 3, 4, 1), np.asarray(fx(*ax)), rtol=1e-5,
                               atol=1e-5)
  assert layers.build(g, "numpy", "bf16", False) is None


def test_timing_blocks_and_reports_spread():
  x = jnp.ones((256, 256))
  t = measure(lambda x: x @ x, x, warmup=1, runs=5)
  assert t.runs == 5 and 0 < t.p10_s <= t.median_s <= t.p90_s and t.spread >= 0


def test_interleaved_timing_warms_up_each_then_runs_in_turns(monkeypatch):
  """A short call is timed right after untimed calls of its own (not after the other
  library's, whose idle threads may still spin); a long one needs no lead-in."""
  calls = []

  def record(name, seconds):
    def call():
      calls.append(name)
      time.sleep(seconds)
    return call
  monkeypatch.setattr(timing, "LEAD_IN_BELOW_S", 0.05)
  monkeypatch.setattr(timing, "LEAD_IN_S", 0.01)
  timings = measure_interleaved([(record("short", 0.002), ()), (record("long", 0.06), ())],
                                warmup=2, runs=3)
  assert calls[:4] == ["short"] * 2 + ["long"] * 2
  rounds = "".join(name[0] for name in calls[4:]).split("l")
  assert rounds[-1] == "" and len(rounds) == 4  # three rounds, each ending in one long call
  assert all(2 <= len(r) <= 6 and set(r) == {"s"} for r in rounds[:3])  # lead-ins + timed
  assert [t.runs for t in timings] == [3, 3] and timings[1].median_s >= 0.06


def test_roofline_prediction_is_the_binding_roof():
  d = roofline.Device("toy", 100e9, 10e9)
  assert d.ridge == 10
  assert d.predicted_seconds(1e9, 1e6) == pytest.approx(1e-2)   # compute-bound
  assert d.predicted_seconds(1e6, 1e9) == pytest.approx(1e-1)   # memory-bound


def test_cost_analysis_names_custom_calls_it_cannot_count():
  """XLA's count stops at a custom call: the BLAS kernel's 2 m n k FLOPs are missing from
  it, so the suite must not present that count as a check of ours."""
  from sdl.kernels import gemm
  a, b = jnp.ones((64, 32), jnp.float32), jnp.ones((32, 48), jnp.float32)
  plain = layers.xla_cost(jax.jit(lambda a, b: a @ b), (a, b))
  blas = layers.xla_cost(jax.jit(lambda a, b: gemm.matmul(a, b, impl="blas")), (a, b))
  assert plain["custom_calls"] == 0 and plain["flops"] == 2 * 64 * 32 * 48
  assert blas["custom_calls"] == 1 and blas.get("flops", 0) < 2 * 64 * 32 * 48


def test_roofline_times_take_each_layers_fastest_jax_path():
  host = roofline.Device("toy", 100e9, 10e9)
  row = lambda layer, impl, usec, precision="highest", pass_="forward": {  # noqa: E731
      "kind": "conv3d", "layer": layer, "impl": impl, "time_usec": usec, "flops": 2e9,
      "bytes": 1e6, "precision": precision, "pass": pass_}
  rows = [row("c1", "xla", 900.0), row("c1", "xla-folded", 300.0), row("c1", "torch", 100.0),
          row("c1", "xla-folded", 50.0, precision="bf16"),
          row("c1", "xla-folded", 60.0, pass_="forward+backward"), row("c2", "xla", 700.0)]
  lines = suite.roofline_times(rows, [host, roofline.A64FX])
  body = [line for line in lines if line.startswith("| c")]
  # 2 GFLOP at 100 GFLOP/s = 20 ms on the toy host; on the A64FX 2e9 / 6.14e12 s
  a64fx = 1e6 * 2e9 / roofline.A64FX.peak_flops
  assert body == [f"| c1 | xla-folded | 300 | 20000.0 | {a64fx:.1f} |",
                  f"| c2 | xla | 700 | 20000.0 | {a64fx:.1f} |"]
  assert suite.roofline_times([row("c1", "torch", 1.0)], [host]) == []


def test_smoke_suite_writes_csv_markdown_and_roofline(tmp_path, monkeypatch):
  # sdl's direct kernel on any CPU (`use_direct` skips it without 512-bit vectors), so that
  # the rows it runs are checked too
  monkeypatch.setenv("SDL_DIRECT_CONV", "on")
  config = configs.get_config("smoke")
  config.impls = ("xla", "xla-folded", "xla-blas", "numpy")
  config.precisions = ("highest",)  # bf16 cells are covered by the command, not the test
  markdown = suite.run(config, str(tmp_path))
  rows = list(csv.DictReader(open(tmp_path / "results.csv")))
  assert list(rows[0])[:8] == ["m", "n", "k", "a_t", "b_t", "precision", "time_usec", "tflops"]
  kinds = {r["kind"] for r in rows}
  assert kinds == {"gemm", "dense", "conv2d", "conv3d", "conv_transpose3d", "transformer",
                   "attention"}
  assert {r["impl"] for r in rows} == {"xla", "xla-folded", "xla-blas", "numpy"}
  for r in rows:
    flops, seconds = float(r["flops"]), float(r["time_usec"]) * 1e-6
    assert math.isclose(float(r["tflops"]), flops / seconds / 1e12, rel_tol=1e-9)
    if r["kind"] == "gemm" and r["pass"] == "forward" and r["xla_flops"]:
      assert abs(float(r["flops_diff_pct"])) <= 1e-6, r["layer"]
    if r["xla_custom_calls"] not in ("", "0"):  # sdl's direct kernel: XLA cannot count it
      assert r["xla_flops"] == r["flops_diff_pct"] == "", r["layer"]
  # the smoke CosmoFlow first layers (4 channels) run sdl's direct kernel when folded
  assert any(r["impl"] == "xla-folded" and r["xla_custom_calls"] not in ("", "0")
             for r in rows)
  png = (tmp_path / "roofline_cpu.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  assert "A64FX" in markdown and "H100" in markdown and "% of peak" in markdown


def test_large_gemm_summary_compares_the_best_jax_path_with_the_best_of_all():
  host = roofline.Device("toy", 200e9, 10e9)
  row = lambda layer, impl, gflops, flops=4e10: {  # noqa: E731
      "kind": "gemm", "precision": "highest", "pass": "forward", "layer": layer,
      "impl": impl, "tflops": gflops / 1e3, "flops": flops}
  rows = [row("big", "xla", 100), row("big", "xla-blas", 150), row("big", "numpy", 160),
          row("small", "xla", 90, flops=1e9)]
  lines = suite.large_gemm_summary(rows, host)
  assert len(lines) == 6 and "small" not in "".join(lines)
  assert lines[-1] == "| big | xla-blas | 150.0 | 160.0 | numpy | 75 % | 94 % |"


@pytest.mark.parametrize("variant", ["mlperf", "lbann"])
def test_cosmoflow_step_flops_against_xla_cost_analysis(variant):
  """XLA counts the same convolution taps and dense products, plus the elementwise work
  (activations, pooling, log1p) that model FLOPs leave out: a little more, never less."""
  size, batch = 32, 2
  model = CosmoFlow(variant, size, conv_lowering="native")
  x = jnp.ones((batch, size, size, size, 4), jnp.int16)
  params = model.init(jax.random.key(0), x[:1])["params"]
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x))))
  xla = layers.xla_cost(grad, (params, x))["flops"]
  ours = problems.cosmoflow_step_flops(variant, size, batch)
  assert ours <= xla <= 1.05 * ours


def test_nominal_peaks_and_the_utilisation_table():
  assert roofline.nominal("NVIDIA H100 80GB HBM3", "bf16").peak_flops == 989.4e12
  assert roofline.nominal("NVIDIA H100 PCIe", "highest").peak_flops == 51e12
  assert roofline.nominal("NVIDIA H200", "default").bandwidth == 4.8e12
  assert roofline.nominal("cpu", "highest") is None
  rows = [("mlperf", {"sdl folded": [2.0, 1.0, 3.0], "torch": [4.0]})]
  lines = step_bench.utilisation_table(rows, {"mlperf": 100e9}, {"xla": 50e9, "xla-blas": 100e9},
                                       roofline.Device("card", 1e12, 1e12))
  assert lines[-2] == "| mlperf | 100.0 | sdl folded | 50.0 | 50 % | 5.0 % |"
  assert lines[-1] == "| mlperf | 100.0 | torch | 25.0 | 25 % | 2.5 % |"
