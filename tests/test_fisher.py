"""The Fisher forecast for generated universes, against a dense real-space Fisher matrix and
against the spectra of generated universes."""
import itertools

import numpy as np

from sdl.data import fisher
from sdl.data import universes as U


def _dense_covariance(theta, spec, n):
  """Σ[(x, i), (y, j)] = ξ_ij(x − y) + [i = j][x = y] / n̄, with ξ_L summed mode by mode."""
  freqs = 2 * np.pi * np.fft.fftfreq(n, d=spec.cell_mpc)
  cells = np.array(list(itertools.product(range(n), repeat=3)))
  xi_l = np.zeros((n, n, n))
  for kvec in itertools.product(freqs, repeat=3):
    k = np.sqrt(np.sum(np.square(kvec)))
    if k > 0:
      phase = np.cos(spec.cell_mpc * cells @ np.array(kvec)).reshape(n, n, n)
      xi_l += U.linear_power(np.array([k]), theta)[0] / spec.cell_mpc ** 3 * phase / n ** 3
  growth = [U.growth_factor(z, theta[0]) for z in spec.redshifts]
  r = len(growth)
  sep = (cells[:, None, :] - cells[None, :, :]) % n  # x − y, periodic
  cov = np.zeros((n ** 3, r, n ** 3, r))
  for i, j in itertools.product(range(r), repeat=2):
    cov[:, i, :, j] = np.expm1(growth[i] * growth[j] * xi_l[sep[..., 0], sep[..., 1], sep[..., 2]])
  cov += np.eye(n ** 3 * r).reshape(cov.shape) / spec.particles_per_voxel
  return cov.reshape(n ** 3 * r, n ** 3 * r)


def test_fisher_equals_the_dense_real_space_fisher():
  """½ Tr[Σ⁻¹ ∂Σ Σ⁻¹ ∂Σ] of the full covariance of a 4³ × 4-channel box equals the per-mode
  sum (which relies on the DFT diagonalising it, and on the half-grid mode counts)."""
  spec = U.UniverseSpec(size=4, cell_mpc=12.0, particles_per_voxel=2.0)
  n, step = 4, 0.02
  scaled = U.scale_params(U.NOMINAL).astype(np.float64)
  sigma = _dense_covariance(U.NOMINAL, spec, n)
  derivs = []
  for a in range(4):
    hi, lo = scaled.copy(), scaled.copy()
    hi[a] += step
    lo[a] -= step
    derivs.append((_dense_covariance(U.unscale_params(hi), spec, n)
                   - _dense_covariance(U.unscale_params(lo), spec, n)) / (2 * step))
  solved = [np.linalg.solve(sigma, d) for d in derivs]
  dense = np.array([[0.5 * np.trace(sa @ sb) for sb in solved] for sa in solved])
  per_mode = fisher.fisher_matrix(spec, n=n, step=step, include_mean=True)
  np.testing.assert_allclose(per_mode, dense, rtol=1e-6, atol=1e-9 * np.abs(dense).max())


def test_channel_covariance_matches_generated_universes():
  """The log-normal + Poisson model of the counts' spectra matches universes generated at the
  same θ: every auto and cross spectrum, in shells of |k|, within 3 standard errors of the
  mean over universes (+1%). The z = 0 field is so skewed that its spectrum scatters by tens
  of percent between universes; the high-redshift ones are pinned to about 1%."""
  spec = U.UniverseSpec(size=32)
  n, universes = spec.size, 24
  model = fisher.channel_covariance(U.NOMINAL, spec)
  k = fisher._k_grid(n, spec.cell_mpc)
  edges = np.quantile(k[k > 0], np.linspace(0, 1, 7))
  shells = [(k > lo) & (k <= hi) for lo, hi in zip(edges[:-1], edges[1:])]
  weights = fisher.mode_weights(n)
  shell_mean = lambda c, s: np.average(c[s], axis=0, weights=weights[s])
  measured = []  # [universe, shell, 4, 4]
  for seed in range(universes):
    counts, _ = U.make_universe(seed, spec, theta=U.NOMINAL)
    g = np.fft.rfftn(counts / spec.particles_per_voxel - 1, axes=(0, 1, 2))
    power = np.einsum("...i,...j->...ij", g, g.conj()).real / n ** 3
    measured.append([shell_mean(power, s) for s in shells])
  measured = np.array(measured)
  expected = np.array([shell_mean(model, s) for s in shells])
  sem = measured.std(0, ddof=1) / np.sqrt(universes)
  error = np.abs(measured.mean(0) - expected)
  assert np.all(error <= 3 * sem + 0.01 * np.abs(expected)), (error / np.abs(expected)).round(3)
  assert np.all(sem[:, 3, 3] < 0.01 * expected[:, 3, 3])  # z = 3: a 1% test
  # the shot noise is a real part of the model: without it the small scales are far off
  without = expected[-1] - np.eye(4) / spec.particles_per_voxel
  assert np.all(np.abs(measured.mean(0)[-1].diagonal() / without.diagonal() - 1)[1:] > 0.1)


def test_forecast_improves_with_volume_and_knows_the_prior():
  """8 × the volume gives at least 5 × less variance on every parameter (a bigger box adds
  large-scale modes that also break degeneracies); where the data say less than the ±10%
  prior, the forecast says so."""
  spec = U.UniverseSpec(size=32)
  small, large = fisher.forecast(spec, 16), fisher.forecast(spec, 32)
  assert np.all(large.mse < small.mse / 5), large.mse / small.mse
  assert np.all(small.mse_with_prior <= np.minimum(small.mse, fisher.PRIOR_VARIANCE))
  np.testing.assert_array_equal(small.prior_tighter, small.mse > 1 / 3)
  assert small.prior_tighter[3]  # H_0 enters only through Γ = Ω_m h: the prior wins at 16³
