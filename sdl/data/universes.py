"""Synthetic dark-matter universes: physically meaningful stand-ins for CosmoFlow's data.

The real data (N-body simulations, 512³ voxels x 4 redshifts of int16 particle counts,
4 parameters each varied ±10% around nominal) cannot be downloaded here. We generate
volumes whose statistics depend on the same parameters through the same physics at the
level of linear theory plus a log-normal model of non-linear clustering:

1. **Parameters** θ = (Ω_m, σ_8, n_s, H_0), each uniform in ±10% of the nominal
   (0.3, 0.8, 0.96, 70 km/s/Mpc), drawn from the universe's seed.
2. **Linear matter power spectrum** P(k) = A kⁿˢ T(k)², k in h/Mpc, with the BBKS
   transfer function (Bardeen, Bond, Kaiser & Szalay 1986, eq. G3)
   T(q) = ln(1 + 2.34q)/(2.34q) · [1 + 3.89q + (16.1q)² + (5.46q)³ + (6.71q)⁴]^(-1/4),
   q = k / Γ, with Sugiyama's (1995) shape parameter Γ = Ω_m h exp(-Ω_b (1 + √(2h)/Ω_m)),
   Ω_b = 0.049. A is fixed by σ_8: σ²(R) = ∫ k² P(k) W(kR)² dk / (2π²) at R = 8 Mpc/h with
   the top-hat window W(x) = 3(sin x − x cos x)/x³.
3. **Gaussian random field** δ_L on an N³ periodic grid of cell size `cell_mpc` Mpc/h:
   white noise, Fourier transformed, scaled by √(P(k)/V_cell), transformed back, so that
   ⟨δ_L²⟩ = (1/V) Σ_k P(k).
4. **Redshifts** z = (0, 0.5, 1.5, 3) (the 4 channels) share the same initial field, scaled
   by the linear growth factor D(z) of flat ΛCDM (Carroll, Press & Turner 1992, eq. 29):
   g(z) = 5/2 Ω_m(z) / [Ω_m(z)^(4/7) − Ω_Λ(z) + (1 + Ω_m(z)/2)(1 + Ω_Λ(z)/70)],
   D(z) = g(z) / (g(0)(1 + z)).
5. **Log-normal density** (Coles & Jones 1991): 1 + δ = exp(D δ_L − D² σ_L²/2), positive,
   with mean 1, skewed like the non-linear density field.
6. **Particle counts**: Poisson(n̄ (1 + δ)) with n̄ = `particles_per_voxel`, clipped to
   int16. Shot noise is what makes small volumes worse predictors than large ones.

Everything is deterministic from the seed. Labels are θ scaled to [-1, 1] over the
±10% ranges (`scale_params` / `unscale_params`).
"""
import dataclasses

import numpy as np

PARAM_NAMES = ("omega_m", "sigma_8", "n_s", "H_0")
NOMINAL = np.array([0.3, 0.8, 0.96, 70.0])
PARAM_LOW, PARAM_HIGH = 0.9 * NOMINAL, 1.1 * NOMINAL
REDSHIFTS = (0.0, 0.5, 1.5, 3.0)
OMEGA_B = 0.049
VERSION = 1  # bump when a change alters the volumes a seed generates


def scale_params(theta: np.ndarray) -> np.ndarray:
  """Physical parameters [..., 4] → [-1, 1]."""
  return (2 * (theta - PARAM_LOW) / (PARAM_HIGH - PARAM_LOW) - 1).astype(np.float32)


def unscale_params(scaled: np.ndarray) -> np.ndarray:
  """[-1, 1] → physical parameters [..., 4]."""
  return PARAM_LOW + (np.asarray(scaled) + 1) / 2 * (PARAM_HIGH - PARAM_LOW)


def bbks_transfer(k: np.ndarray, omega_m: float, h: float) -> np.ndarray:
  """BBKS transfer function; k in h/Mpc."""
  gamma = omega_m * h * np.exp(-OMEGA_B * (1 + np.sqrt(2 * h) / omega_m))
  q = np.maximum(k, 1e-12) / gamma
  return (np.log1p(2.34 * q) / (2.34 * q)
          * (1 + 3.89 * q + (16.1 * q) ** 2 + (5.46 * q) ** 3 + (6.71 * q) ** 4) ** -0.25)


def tophat_sigma2(k: np.ndarray, pk: np.ndarray, radius: float) -> float:
  """σ²(R) = ∫ k² P(k) W(kR)² dk / 2π² on a log-spaced k grid (trapezoid in ln k)."""
  x = k * radius
  w = 3 * (np.sin(x) - x * np.cos(x)) / x ** 3
  integrand = k ** 3 * pk * w ** 2 / (2 * np.pi ** 2)  # d/d ln k
  return float(np.trapezoid(integrand, np.log(k)))


def linear_power(k: np.ndarray, theta: np.ndarray) -> np.ndarray:
  """P(k) in (Mpc/h)³ at z = 0, normalised to σ_8; k in h/Mpc."""
  omega_m, sigma_8, n_s, hubble = theta
  shape = lambda kk: kk ** n_s * bbks_transfer(kk, omega_m, hubble / 100) ** 2
  k_fine = np.logspace(-4, 2, 4096)
  amplitude = sigma_8 ** 2 / tophat_sigma2(k_fine, shape(k_fine), 8.0)
  return amplitude * shape(k)


def growth_factor(z: float, omega_m: float) -> float:
  """Linear growth D(z)/D(0) in flat ΛCDM (Carroll, Press & Turner 1992)."""
  def g(zz):
    e2 = omega_m * (1 + zz) ** 3 + (1 - omega_m)
    om, ol = omega_m * (1 + zz) ** 3 / e2, (1 - omega_m) / e2
    return 2.5 * om / (om ** (4 / 7) - ol + (1 + om / 2) * (1 + ol / 70))
  return g(z) / (g(0.0) * (1 + z))


@dataclasses.dataclass(frozen=True)
class UniverseSpec:
  """How universes are generated: grid size N (voxels per side) and physics knobs."""
  size: int = 64
  cell_mpc: float = 4.0  # voxel side in Mpc/h
  particles_per_voxel: float = 4.0
  redshifts: tuple[float, ...] = REDSHIFTS


def sample_params(seed: int) -> np.ndarray:
  """θ for universe `seed`, uniform in ±10% of nominal."""
  rng = np.random.default_rng([seed, 0])
  return rng.uniform(PARAM_LOW, PARAM_HIGH)


def gaussian_field(seed: int, theta: np.ndarray, spec: UniverseSpec) -> np.ndarray:
  """Linear density contrast δ_L at z = 0, float64 [N, N, N]."""
  n, cell = spec.size, spec.cell_mpc
  noise = np.random.default_rng([seed, 1]).standard_normal((n, n, n))
  kx = 2 * np.pi * np.fft.fftfreq(n, d=cell)
  kz = 2 * np.pi * np.fft.rfftfreq(n, d=cell)
  k = np.sqrt(kx[:, None, None] ** 2 + kx[None, :, None] ** 2 + kz[None, None, :] ** 2)
  pk = np.zeros_like(k)
  pk[k > 0] = linear_power(k[k > 0], theta)
  return np.fft.irfftn(np.fft.rfftn(noise) * np.sqrt(pk / cell ** 3), s=(n, n, n),
                       axes=(0, 1, 2))


def make_universe(seed: int, spec: UniverseSpec = UniverseSpec(),
                  theta: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One universe: int16 counts [N, N, N, len(redshifts)] and its physical θ [4] (drawn
  from the seed unless given)."""
  theta = sample_params(seed) if theta is None else np.asarray(theta, np.float64)
  delta = gaussian_field(seed, theta, spec)
  variance = delta.var()
  rng = np.random.default_rng([seed, 2])
  channels = []
  for z in spec.redshifts:
    d = growth_factor(z, theta[0])
    density = np.exp(d * delta - d ** 2 * variance / 2)
    counts = rng.poisson(spec.particles_per_voxel * density)
    channels.append(np.minimum(counts, np.iinfo(np.int16).max).astype(np.int16))
  return np.stack(channels, axis=-1), theta


def random_crop(volume: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """A periodic crop `[size, size, size, C]` at a random corner (universes are periodic)."""
  n = volume.shape[0]
  if size > n:
    raise ValueError(f"crop size {size} is larger than the universe ({n}³)")
  if size == n:
    return volume
  corner = rng.integers(0, n, size=3)
  idx = [(c + np.arange(size)) % n for c in corner]
  return volume[np.ix_(idx[0], idx[1], idx[2])]
