"""A Fisher forecast for the generated universes (`sdl.data.universes`), from their own physics.

How well could any method measure θ = (Ω_m, σ_8, n_s, H_0) from one periodic N³ box of
counts at the four redshifts, if the counts' Fourier modes were Gaussian? This is the
yardstick the networks are set beside. It is a *forecast*, not a bound: the fields are
log-normal and Poisson, not Gaussian, so a network that sees the voxels (and the log of
the counts) may well do better; a crop of a larger universe is also not periodic.

Exactly for the generator, on its grid:
* δ_L has the grid correlation ξ_L(r) = IDFT[P(k) / V_cell](r) (the generator scales white
  noise by √(P/V_cell) and zeroes k = 0).
* Channel i is 1 + δ_i = exp(D_i δ_L − D_i² σ²/2), so ⟨(1 + δ_i(x))(1 + δ_j(x + r))⟩ =
  exp(D_i D_j ξ_L(r)): the log-normal cross-correlation ξ_ij = exp(D_i D_j ξ_L) − 1.
* Counts are Poisson(n̄ (1 + δ_i)), independent per channel and voxel; g_i = c_i / n̄ − 1
  has covariance ξ_ij(r) + [i = j][r = 0] / n̄ (shot noise).

So each DFT mode k ≠ 0 of g has the 4 × 4 covariance (per N³) C(k) = DFT[ξ_ij](k) + I / n̄,
modes at different k are uncorrelated (the box is periodic), and the Gaussian Fisher
matrix is F_ab = ½ Σ_k Tr[C⁻¹ ∂_a C C⁻¹ ∂_b C] over all k ≠ 0, with derivatives by central
differences in θ. Parameters are in the labels' [-1, 1] units (`universes.scale_params`),
so diag(F⁻¹) is directly comparable with a network's validation MSE; the ±10% uniform prior
alone gives an MSE of 1/3.
"""
import dataclasses

import numpy as np

from sdl.data import universes as U

PRIOR_VARIANCE = 1 / 3  # a uniform label in [-1, 1]: the mean predictor's expected MSE


def _k_grid(n: int, cell: float) -> np.ndarray:
  """|k| in h/Mpc on the rfftn half grid of an n³ box of `cell` Mpc/h voxels."""
  kx = 2 * np.pi * np.fft.fftfreq(n, d=cell)
  kz = 2 * np.pi * np.fft.rfftfreq(n, d=cell)
  return np.sqrt(kx[:, None, None] ** 2 + kx[None, :, None] ** 2 + kz[None, None, :] ** 2)


def mode_weights(n: int) -> np.ndarray:
  """How many full-grid modes each rfftn half-grid entry stands for (k and −k: 2, except
  on the planes k_z = 0 and k_z = Nyquist, which hold both themselves)."""
  w = np.full(n // 2 + 1, 2.0)
  w[0] = 1.0
  if n % 2 == 0:
    w[-1] = 1.0
  return np.broadcast_to(w, (n, n, n // 2 + 1))


def linear_correlation(theta: np.ndarray, spec: U.UniverseSpec, n: int | None = None) -> np.ndarray:
  """ξ_L(r) of the generator's Gaussian field on the n³ grid (float64 [n, n, n])."""
  n = n or spec.size
  k = _k_grid(n, spec.cell_mpc)
  pk = np.zeros_like(k)
  pk[k > 0] = U.linear_power(k[k > 0], theta)
  return np.fft.irfftn(pk / spec.cell_mpc ** 3, s=(n, n, n), axes=(0, 1, 2))


def channel_covariance(theta: np.ndarray, spec: U.UniverseSpec,
                       n: int | None = None) -> np.ndarray:
  """C(k) [n, n, n//2+1, R, R] on the rfftn half grid: the covariance per N³ of the DFT of
  g_i = counts_i / n̄ − 1 across the R redshift channels, shot noise included."""
  n = n or spec.size
  xi = linear_correlation(theta, spec, n)
  growth = [U.growth_factor(z, theta[0]) for z in spec.redshifts]
  r = len(growth)
  cov = np.empty((n, n, n // 2 + 1, r, r))
  for i in range(r):
    for j in range(i, r):
      # ξ_ij is real and even, so its DFT is real
      cov[..., i, j] = cov[..., j, i] = np.fft.rfftn(np.expm1(growth[i] * growth[j] * xi)).real
  cov[..., np.arange(r), np.arange(r)] += 1 / spec.particles_per_voxel
  return cov


def gaussian_fisher(cov: np.ndarray, derivs: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
  """F_ab = ½ Σ_modes w Tr[C⁻¹ ∂_a C C⁻¹ ∂_b C] for per-mode covariances `cov` [..., R, R],
  their derivatives `derivs` (one [..., R, R] per parameter) and mode counts `weights`."""
  solved = [np.linalg.solve(cov, d) for d in derivs]  # C⁻¹ ∂_a C, per mode
  p = len(derivs)
  fisher = np.empty((p, p))
  for a in range(p):
    for b in range(a, p):
      trace = np.einsum("...ij,...ji->...", solved[a], solved[b])
      fisher[a, b] = fisher[b, a] = 0.5 * np.sum(weights * trace)
  return fisher


def fisher_matrix(spec: U.UniverseSpec, theta: np.ndarray = U.NOMINAL, n: int | None = None,
                  step: float = 0.02, include_mean: bool = False) -> np.ndarray:
  """The 4 × 4 Fisher matrix of one periodic n³ box (default: the spec's size) at θ, in the
  labels' [-1, 1] units; central differences of `step` in those units. The k = 0 mode (the
  mean count) is left out unless `include_mean`: its model, a Gaussian of variance
  Σ_r ξ(r), ignores that the generator fixes the mean density."""
  n = n or spec.size
  scaled = U.scale_params(np.asarray(theta, np.float64)).astype(np.float64)
  cov = channel_covariance(theta, spec, n)
  derivs = []
  for a in range(len(scaled)):
    hi, lo = scaled.copy(), scaled.copy()
    hi[a] += step
    lo[a] -= step
    derivs.append((channel_covariance(U.unscale_params(hi), spec, n)
                   - channel_covariance(U.unscale_params(lo), spec, n)) / (2 * step))
  weights = mode_weights(n).copy()
  if not include_mean:
    weights[0, 0, 0] = 0.0
  return gaussian_fisher(cov, derivs, weights)


@dataclasses.dataclass(frozen=True)
class Forecast:
  """Per-parameter forecast MSEs (labels' units) for one box of `size`³ voxels."""
  size: int
  fisher: np.ndarray
  mse: np.ndarray             # diag(F⁻¹): the data alone
  mse_with_prior: np.ndarray  # diag((F + I/PRIOR_VARIANCE)⁻¹): the ±10% prior as a Gaussian

  @property
  def prior_tighter(self) -> np.ndarray:
    """Where the ±10% prior alone beats the data's forecast."""
    return self.mse > PRIOR_VARIANCE

  def rows(self) -> list[dict]:
    return [{"param": name, "forecast_mse": float(m), "with_prior_mse": float(mp),
             "prior_tighter": bool(t)}
            for name, m, mp, t in zip(U.PARAM_NAMES, self.mse, self.mse_with_prior,
                                      self.prior_tighter)]


def forecast(spec: U.UniverseSpec, size: int | None = None,
             theta: np.ndarray = U.NOMINAL) -> Forecast:
  """The Fisher forecast for one periodic box of `size`³ voxels (default: the spec's)."""
  size = size or spec.size
  f = fisher_matrix(spec, theta, size)
  return Forecast(size, f, np.diag(np.linalg.inv(f)),
                  np.diag(np.linalg.inv(f + np.eye(len(f)) / PRIOR_VARIANCE)))


def main(argv=None) -> None:
  """`python -m sdl.data.fisher [--sizes=32,64,128] [--cell_mpc=4] [--particles=4]`: the
  forecast MSE per parameter for periodic boxes of each size, at the nominal cosmology."""
  import argparse  # noqa: PLC0415
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--sizes", default="32,64,128")
  parser.add_argument("--cell_mpc", type=float, default=4.0)
  parser.add_argument("--particles", type=float, default=4.0)
  args = parser.parse_args(argv)
  print(f"Gaussian Fisher forecast, {args.cell_mpc} Mpc/h voxels, n̄ = {args.particles}, "
        "θ nominal; MSE in the labels' [-1, 1] units (the ±10% prior alone: 1/3)")
  print("| box | " + " | ".join(U.PARAM_NAMES) + " |\n|---|" + "---|" * len(U.PARAM_NAMES))
  for size in (int(s) for s in args.sizes.split(",")):
    f = forecast(U.UniverseSpec(size=size, cell_mpc=args.cell_mpc,
                                particles_per_voxel=args.particles))
    cells = [f"{m:.2g} ({mp:.2g})" + (" prior tighter" if t else "")
             for m, mp, t in zip(f.mse, f.mse_with_prior, f.prior_tighter)]
    print(f"| {size}³ | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
