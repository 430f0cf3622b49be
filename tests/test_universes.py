"""Synthetic universes against closed forms, quadrature and a learnability check."""
import numpy as np
import pytest
from scipy import integrate

from sdl.data import synthetic, universes as U
from sdl.data.sampler import EpochSampler


def test_growth_factor_matches_exact_integral():
  # Exact linear growth in flat ΛCDM (Heath 1977): D(a) ∝ H(a) ∫_0^a da' / (a' H(a'))³.
  for omega_m in (0.27, 0.3, 0.33):
    hubble = lambda a: np.sqrt(omega_m / a ** 3 + 1 - omega_m)
    exact = lambda a: hubble(a) * integrate.quad(lambda x: 1 / (x * hubble(x)) ** 3, 0, a)[0]
    for z in U.REDSHIFTS:
      ratio = exact(1 / (1 + z)) / exact(1.0)
      # Carroll, Press & Turner's fit is good to ~1% in this range.
      assert U.growth_factor(z, omega_m) == pytest.approx(ratio, rel=1e-2)
  # Einstein-de Sitter: D = a exactly.
  assert U.growth_factor(3.0, 1.0) == pytest.approx(0.25, rel=1e-9)


def test_power_spectrum_is_normalised_to_sigma8():
  theta = np.array([0.31, 0.77, 0.95, 68.0])
  radius = 8.0
  def integrand(lnk):
    k = np.exp(lnk)
    x = k * radius
    w = 3 * (np.sin(x) - x * np.cos(x)) / x ** 3
    return k ** 3 * U.linear_power(np.array([k]), theta)[0] * w ** 2 / (2 * np.pi ** 2)
  sigma2 = integrate.quad(integrand, np.log(1e-4), np.log(1e2), limit=400)[0]
  assert np.sqrt(sigma2) == pytest.approx(0.77, rel=2e-3)
  # BBKS: T -> 1 on large scales, falls like ln(q)/q² on small ones.
  assert U.bbks_transfer(np.array([1e-5]), 0.3, 0.7)[0] == pytest.approx(1, abs=1e-3)


def test_gaussian_field_has_the_requested_power():
  spec = U.UniverseSpec(size=48, cell_mpc=4.0)
  theta = U.sample_params(5)
  delta = np.mean([U.gaussian_field(s, theta, spec).var() for s in range(4)])
  n, cell = spec.size, spec.cell_mpc
  kx = 2 * np.pi * np.fft.fftfreq(n, d=cell)
  k = np.sqrt(kx[:, None, None] ** 2 + kx[None, :, None] ** 2 + kx[None, None, :] ** 2)
  expected = U.linear_power(k[k > 0], theta).sum() / (n * cell) ** 3
  assert delta == pytest.approx(expected, rel=0.05)


def test_universes_are_deterministic_and_physical():
  spec = U.UniverseSpec(size=32)
  a, theta_a = U.make_universe(7, spec)
  b, theta_b = U.make_universe(7, spec)
  c, theta_c = U.make_universe(8, spec)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(theta_a, theta_b)
  assert not np.array_equal(a, c) and not np.array_equal(theta_a, theta_c)
  assert a.dtype == np.int16 and a.shape == (32, 32, 32, 4)
  assert np.all((theta_a >= U.PARAM_LOW) & (theta_a <= U.PARAM_HIGH))
  # Mean count is n̄ at every redshift; clustering grows with time (lower z: more variance).
  means, stds = a.reshape(-1, 4).mean(0), a.reshape(-1, 4).std(0)
  np.testing.assert_allclose(means, spec.particles_per_voxel, rtol=0.1)
  assert np.all(np.diff(stds) < 0)
  np.testing.assert_allclose(U.unscale_params(U.scale_params(theta_a)), theta_a)


def test_crops_are_periodic_windows():
  volume = np.arange(8 ** 3 * 1, dtype=np.int16).reshape(8, 8, 8, 1)
  rng = np.random.default_rng(0)
  crop = U.random_crop(volume, 4, rng)
  corner = np.random.default_rng(0).integers(0, 8, size=3)
  rolled = np.roll(volume, shift=tuple(-corner), axis=(0, 1, 2))[:4, :4, :4]
  np.testing.assert_array_equal(crop, rolled)


def summary_features(volume):
  """Per channel: moments of log1p counts and the power in 4 k-bins."""
  x = np.log1p(volume.astype(np.float64))
  n = x.shape[0]
  f = np.fft.fftfreq(n)
  k = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + np.fft.rfftfreq(n)[None, None] ** 2)
  out = []
  for c in range(x.shape[-1]):
    a = x[..., c] - x[..., c].mean()
    power = np.abs(np.fft.rfftn(a)) ** 2
    out += [x[..., c].mean(), a.var(), (a ** 3).mean()]
    out += [np.log(power[(k > lo) & (k <= hi)].mean())
            for lo, hi in ((0, .1), (.1, .2), (.2, .35), (.35, .6))]
  return np.array(out)


def test_parameters_are_learnable_from_the_volume():
  """Ridge regression on summary statistics beats predicting the mean on new universes."""
  data = synthetic.make_dataset(range(160), U.UniverseSpec(size=32), 32, 1, progress=False)
  x = np.array([summary_features(v) for v in data.volumes])
  y = data.labels
  train, test = slice(0, 128), slice(128, None)
  mu, sd = x[train].mean(0), x[train].std(0)
  design = lambda s: np.c_[(x[s] - mu) / sd, np.ones(len(x[s]))]
  w = np.linalg.solve(design(train).T @ design(train) + 0.1 * np.eye(x.shape[1] + 1),
                      design(train).T @ y[train])
  model_mae = np.abs(design(test) @ w - y[test]).mean(0)
  mean_mae = np.abs(y[train].mean(0) - y[test]).mean(0)
  # Ω_m, σ_8 and n_s are strongly constrained; H_0 (only through the shape Γ = Ω_m h) weakly.
  assert np.all(model_mae[:3] < 0.7 * mean_mae[:3]), (model_mae, mean_mae)
  assert model_mae.mean() < 0.75 * mean_mae.mean()


def test_epoch_sampler_visits_each_sample_once_per_epoch():
  sampler = EpochSampler(num_samples=22, batch_size=4, seed=3)
  assert sampler.steps_per_epoch == 5
  epochs = [np.concatenate([sampler.indices(e * 5 + s) for s in range(5)]) for e in range(3)]
  for seen in epochs:
    assert len(set(seen.tolist())) == 20  # no repeats within an epoch
  assert not np.array_equal(epochs[0], epochs[1])
  again = EpochSampler(22, 4, 3)
  np.testing.assert_array_equal(again.indices(7), sampler.indices(7))
  assert not np.array_equal(EpochSampler(22, 4, 4).indices(0), sampler.indices(0))
