"""Simulated multi-speaker recordings, by the EEND simulation algorithm (Fujita et al.,
Interspeech 2019, Algorithm 1), with the noise and rooms of the noisy front-end setting.

Per mixture: `speakers` distinct speakers; each speaks `utterances` (10-20) utterances,
each preceded by a silence drawn from Exp(beta) seconds; the tracks (optionally each
convolved with its own simulated room impulse response) are summed; background noise is
added at an SNR drawn from `snrs`. Labels are speaker activity: an utterance is active
over its whole (silence-trimmed) span, as EEND's are over Kaldi segments.

Noise is generated (white, pink, brown, and a mains hum with harmonics under pink
noise); no package here ships noise recordings. Room impulse responses are
exponentially decaying noise with a direct path (RT60 drawn from 0.2-0.8 s), the usual
statistical room model.
"""
import dataclasses

import numpy as np

NOISES = ("white", "pink", "brown", "hum")


@dataclasses.dataclass(frozen=True)
class Mixture:
  audio: np.ndarray  # float32 [samples]
  segments: list[tuple[int, float, float]]  # (speaker slot, start s, end s), in order
  rate: int
  speakers: tuple[str, ...]  # the slots' speaker names
  snr_db: float

  def activity(self, frames: int, hop_s: float) -> np.ndarray:
    """float32 [frames, speakers]: 1 where a speaker is active at a frame's centre
    (frames every `hop_s`, centred at `(i + 0.5) hop_s`)."""
    return activity(self.segments, len(self.speakers), frames, hop_s)


def activity(segments, speakers: int, frames: int, hop_s: float) -> np.ndarray:
  out = np.zeros((frames, speakers), np.float32)
  centres = (np.arange(frames) + 0.5) * hop_s
  for slot, start, end in segments:
    out[(centres >= start) & (centres < end), slot] = 1.0
  return out


def overlap_ratio(labels: np.ndarray) -> float:
  """The share of speech frames (some speaker active) where two or more speak."""
  active = labels.sum(-1)
  speech = (active > 0).sum()
  return float((active > 1).sum() / speech) if speech else 0.0


def noise(kind: str, samples: int, rng: np.random.Generator, rate: int) -> np.ndarray:
  """Unit-power noise of `kind` (one of NOISES)."""
  white = rng.standard_normal(samples)
  if kind == "white":
    x = white
  else:
    spectrum = np.fft.rfft(white)
    f = np.maximum(np.fft.rfftfreq(samples, 1 / rate), 20.0)
    exponent = {"pink": 0.5, "brown": 1.0, "hum": 0.5}[kind]
    x = np.fft.irfft(spectrum / f ** exponent, samples)
    if kind == "hum":
      t = np.arange(samples) / rate
      mains = rng.choice([50.0, 60.0])
      x = x / x.std() * 0.3 + sum(np.sin(2 * np.pi * k * mains * t + rng.uniform(0, 6.3)) / k
                                  for k in (1, 2, 3, 5))
  return (x / max(x.std(), 1e-12)).astype(np.float32)


def room_impulse_response(rng: np.random.Generator, rate: int) -> np.ndarray:
  """A statistical RIR: a direct path, then exponentially decaying noise (60 dB down at
  RT60), unit peak."""
  rt60 = rng.uniform(0.2, 0.8)
  n = int(rate * rt60)
  t = np.arange(n) / rate
  tail = rng.standard_normal(n) * 10 ** (-3 * t / rt60) * 0.3
  delay = int(rate * rng.uniform(0.001, 0.004))
  h = np.zeros(n + delay)
  h[delay] = 1.0
  h[delay + 1:] += tail[:len(h) - delay - 1]
  return h / np.abs(h).max()


def _convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
  n = len(x) + len(h) - 1
  size = 1 << (n - 1).bit_length()
  return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[:len(x)]


def simulate(utterances: list[list[np.ndarray]], names, rng: np.random.Generator, *,
             rate: int, beta: float = 2.0, utterances_per_speaker=(10, 20),
             snrs=(5, 10, 15, 20), noises=NOISES, rir: bool = False) -> Mixture:
  """One mixture of the speakers whose utterance pools are `utterances` (one list per
  speaker, drawn with replacement when a pool is small)."""
  tracks, segments = [], []
  for slot, pool in enumerate(utterances):
    count = rng.integers(utterances_per_speaker[0], utterances_per_speaker[1] + 1)
    pieces, t = [], 0
    for i in rng.integers(0, len(pool), count):
      silence = int(rng.exponential(beta) * rate)
      pieces += [np.zeros(silence, np.float32), pool[i]]
      t += silence
      segments.append((slot, t / rate, (t + len(pool[i])) / rate))
      t += len(pool[i])
    track = np.concatenate(pieces)
    # every speaker at the same level, as in the EEND recipes' unit-power utterances
    tracks.append(track / max(np.sqrt(np.mean(np.concatenate(
        [pool[i] for i in range(min(3, len(pool)))]) ** 2)), 1e-9))
  if rir:  # drawn after the timelines, so that a room changes none of them
    tracks = [_convolve(x, room_impulse_response(rng, rate)) for x in tracks]
  length = max(len(x) for x in tracks)
  mix = np.zeros(length)
  for x in tracks:
    mix[:len(x)] += x
  snr = float(rng.choice(snrs))
  # SNR: the summed speech's power where someone speaks, against the noise's
  speaking = np.zeros(length, bool)
  for _, start, end in segments:
    speaking[int(start * rate):int(end * rate)] = True
  speech_power = np.mean(mix[speaking] ** 2) if speaking.any() else 1.0
  mix += noise(rng.choice(noises), length, rng, rate) * np.sqrt(speech_power / 10 ** (snr / 10))
  mix *= 0.5 / max(np.abs(mix).max(), 1e-9)
  segments.sort(key=lambda s: (s[1], s[0]))
  return Mixture(mix.astype(np.float32), segments, rate, tuple(names), snr)
