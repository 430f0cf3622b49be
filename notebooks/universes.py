# %% [markdown]
# # A look at the synthetic universes
#
# Percent-format notebook: open it in Jupyter (with jupytext) or VS Code and run cell by
# cell, or run it whole: `python notebooks/universes.py [OUT_DIR]`. The tests run it too.
# It draws one universe at the four redshifts and the power spectra of universes with
# low and high σ_8, and writes `universes.png`.

# %%
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sdl.data import universes as U  # noqa: E402

out_dir = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "runs"
os.makedirs(out_dir, exist_ok=True)
spec = U.UniverseSpec(size=64, cell_mpc=4.0, particles_per_voxel=4.0)

# %% Two universes: pick the seeds with the lowest and highest σ_8 among the first 20.
seeds = sorted(range(20), key=lambda s: U.sample_params(s)[1])
low, high = seeds[0], seeds[-1]
volume, theta = U.make_universe(high, spec)
print("θ =", dict(zip(U.PARAM_NAMES, np.round(theta, 3))))


# %% Power spectrum of log1p(counts), in radial k-bins.
def log_power(vol, bins=12):
  x = np.log1p(vol.astype(np.float64))
  x -= x.mean()
  n = x.shape[0]
  f = np.fft.fftfreq(n, d=spec.cell_mpc) * 2 * np.pi
  k = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2
              + (np.fft.rfftfreq(n, d=spec.cell_mpc) * 2 * np.pi)[None, None] ** 2)
  power = np.abs(np.fft.rfftn(x)) ** 2 * spec.cell_mpc ** 3 / n ** 3
  edges = np.logspace(np.log10(k[k > 0].min()), np.log10(k.max()), bins + 1)
  idx = np.digitize(k.ravel(), edges)
  centres = np.sqrt(edges[1:] * edges[:-1])
  means = np.array([power.ravel()[idx == i].mean() if np.any(idx == i) else np.nan
                    for i in range(1, bins + 1)])
  return centres, means


# %% Plot: slices at each redshift, then spectra.
fig, axes = plt.subplots(1, 5, figsize=(17, 4.0))
for c, z in enumerate(spec.redshifts):
  axes[c].imshow(np.log1p(volume[:, :, spec.size // 2, c]), cmap="magma")
  axes[c].set_title(f"z = {z}  (log1p counts)")
  axes[c].axis("off")
for seed, style in ((low, "--"), (high, "-")):
  vol, th = U.make_universe(seed, spec)
  for c in (0, 3):
    k, p = log_power(vol[..., c])
    axes[4].loglog(k, p, style, label=f"σ8={th[1]:.3f}, z={spec.redshifts[c]}")
axes[4].set_xlabel("k [h/Mpc]")
axes[4].set_ylabel("P(k) of log1p counts")
axes[4].legend(fontsize=7)
fig.tight_layout()
path = os.path.join(out_dir, "universes.png")
fig.savefig(path, dpi=100)
print("wrote", path)
