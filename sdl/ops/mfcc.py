"""Log-mel filterbank energies and MFCCs in plain `jax.numpy`: jittable and batched.

The definitions follow python-speech-features 0.6 (the tests' reference), step by step:

1. pre-emphasis `y[0] = x[0]`, `y[n] = x[n] - a x[n-1]`;
2. framing: frames of `round(win_s * rate)` samples every `round(hop_s * rate)`, the last
   one zero-padded, `1 + ceil((n - frame) / hop)` frames (one for a signal no longer than a
   frame);
3. a window per frame (`rect`, `hamming` or `hann`);
4. power spectrum `|rfft(frame, nfft)|^2 / nfft`, `nfft` the power of two at or above a
   frame;
5. triangular mel filters (mel = 2595 log10(1 + f / 700)) on FFT bins
   `floor((nfft + 1) f / rate)`; a zero energy becomes float64's eps before the log;
6. log, an orthonormal DCT-II, the first `n_cepstra` coefficients, sinusoidal liftering
   `1 + L/2 sin(pi n / L)`; optionally coefficient 0 replaced by the log frame energy.

Shapes: signals `[..., samples]`, features `[..., frames, n_filters]` (log-mel) or
`[..., frames, n_cepstra]` (MFCC). Sizes are static: they come from the signal's shape.
"""
import dataclasses
import math

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class MfccConfig:
  """Feature settings (defaults: python-speech-features' `mfcc`, but a Hamming window)."""
  sample_rate: int = 16000
  win_s: float = 0.025
  hop_s: float = 0.010
  n_filters: int = 26
  n_cepstra: int = 13
  low_hz: float = 0.0
  high_hz: float | None = None  # None: the Nyquist frequency
  preemphasis: float = 0.97
  lifter: int = 22
  window: str = "hamming"  # rect | hamming | hann
  append_energy: bool = True  # coefficient 0 := log frame energy
  nfft: int | None = None  # None: the power of two at or above a frame

  @property
  def frame_length(self) -> int:
    return _round_half_up(self.win_s * self.sample_rate)

  @property
  def hop_length(self) -> int:
    return _round_half_up(self.hop_s * self.sample_rate)

  @property
  def fft_size(self) -> int:
    return self.nfft or 1 << max(0, math.ceil(math.log2(self.frame_length)))


def _round_half_up(x: float) -> int:
  return int(math.floor(x + 0.5))


def num_frames(num_samples: int, cfg: MfccConfig) -> int:
  """Frames of a signal of `num_samples` samples (python-speech-features' framing)."""
  if num_samples <= cfg.frame_length:
    return 1
  return 1 + math.ceil((num_samples - cfg.frame_length) / cfg.hop_length)


def hz_to_mel(hz):
  return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
  return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_filterbank(cfg: MfccConfig) -> np.ndarray:
  """float64 [n_filters, nfft // 2 + 1]: triangles between mel-spaced FFT bins."""
  high = cfg.high_hz or cfg.sample_rate / 2
  if not 0 <= cfg.low_hz < high <= cfg.sample_rate / 2:
    raise ValueError(f"mel filters: need 0 <= low_hz < high_hz <= {cfg.sample_rate / 2} Hz, "
                     f"got {cfg.low_hz} and {high}")
  mels = np.linspace(hz_to_mel(cfg.low_hz), hz_to_mel(high), cfg.n_filters + 2)
  bins = np.floor((cfg.fft_size + 1) * mel_to_hz(mels) / cfg.sample_rate)
  k = np.arange(cfg.fft_size // 2 + 1)[None, :]
  left, centre, right = bins[:-2, None], bins[1:-1, None], bins[2:, None]
  with np.errstate(divide="ignore", invalid="ignore"):
    rising = np.where((k >= left) & (k < centre), (k - left) / (centre - left), 0.0)
    falling = np.where((k >= centre) & (k < right), (right - k) / (right - centre), 0.0)
  return rising + falling


def window(cfg: MfccConfig) -> np.ndarray:
  n = cfg.frame_length
  if cfg.window == "rect":
    return np.ones(n)
  if cfg.window == "hamming":
    return np.hamming(n)
  if cfg.window == "hann":
    return np.hanning(n)
  raise ValueError(f"window {cfg.window!r}: choose rect, hamming or hann")


def dct_matrix(n_in: int, n_out: int) -> np.ndarray:
  """float64 [n_in, n_out]: the orthonormal DCT-II (scipy's `dct(type=2, norm="ortho")`)."""
  n = np.arange(n_in)[:, None]
  k = np.arange(n_out)[None, :]
  basis = np.cos(np.pi * k * (2 * n + 1) / (2 * n_in)) * np.sqrt(2.0 / n_in)
  basis[:, 0] /= np.sqrt(2.0)
  return basis


def frames(signal, cfg: MfccConfig, previous=None, length=None):
  """[..., frames, frame_length]: pre-emphasised, zero-padded and windowed frames.
  `previous` (`[...]`): the sample before `signal`, where it continues a longer one (a
  stream read piece by piece: its frames then equal the whole signal's). `length`: the
  samples that are signal, where `signal` was zero-padded to a shape shared by many (the
  padding is zeroed after pre-emphasis, so the frames are those of the unpadded signal)."""
  x = jnp.asarray(signal)
  first = x[..., :1] if previous is None else (
      x[..., :1] - cfg.preemphasis * jnp.asarray(previous, x.dtype)[..., None])
  x = jnp.concatenate([first, x[..., 1:] - cfg.preemphasis * x[..., :-1]], axis=-1)
  if length is not None:
    x = jnp.where(jnp.arange(x.shape[-1]) < length, x, 0)
  count = num_frames(x.shape[-1], cfg)
  padded = (count - 1) * cfg.hop_length + cfg.frame_length
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padded - x.shape[-1])])
  starts = np.arange(count)[:, None] * cfg.hop_length + np.arange(cfg.frame_length)[None, :]
  return x[..., starts] * jnp.asarray(window(cfg), x.dtype)


def power_spectrum(signal, cfg: MfccConfig, previous=None, length=None):
  """[..., frames, nfft // 2 + 1]: |rfft|^2 / nfft of each frame."""
  f = frames(signal, cfg, previous, length)
  if f.shape[-1] > cfg.fft_size:  # python-speech-features truncates, as numpy's rfft does
    f = f[..., :cfg.fft_size]
  spectrum = jnp.fft.rfft(f, n=cfg.fft_size, axis=-1)
  return (spectrum.real ** 2 + spectrum.imag ** 2) / cfg.fft_size


# The floor for a zero energy: float64's eps in every precision, as the reference has it
# (digital silence then gives the same log in float32 as in float64).
_EPS = float(np.finfo(np.float64).eps)


def _floor_eps(x):
  return jnp.where(x == 0, jnp.asarray(_EPS, x.dtype), x)


def filterbank_energies(signal, cfg: MfccConfig, previous=None, length=None):
  """([..., frames, n_filters] mel energies, [..., frames] frame energies)."""
  power = power_spectrum(signal, cfg, previous, length)
  fb = jnp.asarray(mel_filterbank(cfg).T, power.dtype)
  return _floor_eps(power @ fb), _floor_eps(power.sum(-1))


def log_mel(signal, cfg: MfccConfig = MfccConfig(), previous=None, length=None):
  """[..., frames, n_filters]: log mel filterbank energies (python-speech-features'
  `logfbank`)."""
  return jnp.log(filterbank_energies(signal, cfg, previous, length)[0])


def mfcc(signal, cfg: MfccConfig = MfccConfig(), previous=None, length=None):
  """[..., frames, n_cepstra]: MFCCs (python-speech-features' `mfcc`)."""
  energies, frame_energy = filterbank_energies(signal, cfg, previous, length)
  logs = jnp.log(energies)
  cepstra = logs @ jnp.asarray(dct_matrix(cfg.n_filters, cfg.n_cepstra), logs.dtype)
  if cfg.lifter > 0:
    n = np.arange(cfg.n_cepstra)
    cepstra = cepstra * jnp.asarray(1 + cfg.lifter / 2 * np.sin(np.pi * n / cfg.lifter),
                                    logs.dtype)
  if cfg.append_energy:
    cepstra = cepstra.at[..., 0].set(jnp.log(frame_energy))
  return cepstra
