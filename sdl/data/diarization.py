"""Diarization datasets: simulated mixtures (`sdl.data.mixtures`) stored as MFCC frames
with their speaker segments, and training crops of them.

A set is a directory of `mix-<i>.npz` files (written atomically, resumed file by file,
with progress), each holding:
  features  float32 [frames, n_cepstra]: MFCCs every `hop_s` (`sdl.ops.mfcc`)
  segments  float64 [segments, 3]: (speaker slot, start s, end s)
  speakers  the slots' speaker names; snr_db; num_samples; rate
  audio     int16 [samples], only for the first `keep_audio` mixtures of a set (for
            listening, streaming and the notebook)
The speakers come from `speakers_for(...)`: pseudo-speakers' utterance files written by
`sdl.data.speech.write_utterances`, or synthetic voices made on the fly.
"""
import dataclasses
import functools
import os
import time

import jax
import numpy as np

from sdl import console
from sdl.data import mixtures, speech
from sdl.errors import DataError
from sdl.ops import mfcc as mfcc_lib


def mfcc_config(features) -> mfcc_lib.MfccConfig:
  """The feature settings of a config's `features` section."""
  return mfcc_lib.MfccConfig(sample_rate=features.rate, win_s=features.win_s,
                             hop_s=features.hop_s, n_filters=features.n_filters,
                             n_cepstra=features.n_cepstra)


@functools.lru_cache(maxsize=None)
def mfcc_function(cfg: mfcc_lib.MfccConfig):
  """The jitted `(samples, previous=None, length=None) -> MFCC frames` of `cfg`, one per
  config (`sdl.ops.mfcc.mfcc`'s arguments; a stream passes its pieces and `previous`)."""
  return jax.jit(lambda x, previous=None, length=None: mfcc_lib.mfcc(x, cfg, previous, length))


def features_of(audio: np.ndarray, cfg: mfcc_lib.MfccConfig, bucket_s: float = 4.0
                ) -> np.ndarray:
  """MFCC frames [frames, n_cepstra] of a whole recording. The signal is zero-padded to a
  multiple of `bucket_s` seconds so that few shapes compile; the frames kept are the
  unpadded signal's (its last frames are zero-padded by the framing anyway)."""
  count = mfcc_lib.num_frames(len(audio), cfg)
  step = max(1, int(bucket_s * cfg.sample_rate))
  padded = np.zeros(-(-max(len(audio), 1) // step) * step + cfg.frame_length, np.float32)
  padded[:len(audio)] = audio
  return np.asarray(mfcc_function(cfg)(padded, length=len(audio)))[:count]


@dataclasses.dataclass(frozen=True)
class Recording:
  name: str
  features: np.ndarray
  segments: list  # (slot, start s, end s)
  speakers: tuple
  snr_db: float
  audio: np.ndarray | None  # float32, where kept
  rate: int

  num_samples: int = 0

  @property
  def seconds(self) -> float:
    return self.num_samples / self.rate

  def labels(self, frames: int, frame_s: float) -> np.ndarray:
    return mixtures.activity(self.segments, len(self.speakers), frames, frame_s)


def load(path: str) -> Recording:
  try:
    with np.load(path) as f:
      audio = f["audio"].astype(np.float32) / 32767 if "audio" in f.files else None
      return Recording(os.path.basename(path)[:-4], f["features"],
                       [(int(s), float(a), float(b)) for s, a, b in f["segments"]],
                       tuple(str(s) for s in f["speakers"]), float(f["snr_db"]), audio,
                       int(f["rate"]), int(f["num_samples"]))
  except (OSError, KeyError, ValueError) as error:
    raise DataError(f"{path}: not a mixture file ({error}); rewrite the set with "
                    "experiments.speech_data") from error


class SpeakerPool:
  """Utterances of a list of speakers, read (or, for synthetic voices, made) on first use."""

  def __init__(self, speakers: list[speech.Speaker], utterance_dir: str | None, rate: int,
               synthetic_utterances: int = 12):
    self.speakers, self.dir, self.rate = speakers, utterance_dir, rate
    self.count = synthetic_utterances
    self.cache: dict = {}

  def utterances(self, i: int) -> list[np.ndarray]:
    if i not in self.cache:
      s = self.speakers[i]
      if s.engine == "synthetic":
        rng = np.random.default_rng([int(s.voice), 7])
        self.cache[i] = [speech.synthesize(s, "", self.rate, rng) for _ in range(self.count)]
      else:
        self.cache[i] = speech.read_utterances(self.dir, s)
    return self.cache[i]


def write_mixtures(directory: str, pool: SpeakerPool, count: int, seed: int, data, features,
                   keep_audio: int = 0) -> list[str]:
  """Simulate `count` mixtures of `data.speakers` distinct speakers from `pool` into
  `directory` (those already there are kept); returns their paths."""
  os.makedirs(directory, exist_ok=True)
  cfg = mfcc_config(features)
  if len(pool.speakers) < data.speakers:
    raise DataError(f"{directory}: {len(pool.speakers)} speakers for mixtures of "
                    f"{data.speakers}; add speakers or lower data.speakers")
  paths, start = [], time.perf_counter()
  for i in range(count):
    path = os.path.join(directory, f"mix-{i:05d}.npz")
    paths.append(path)
    if not os.path.exists(path):
      rng = np.random.default_rng([seed, i])
      chosen = rng.choice(len(pool.speakers), data.speakers, replace=False)
      mix = mixtures.simulate([pool.utterances(j) for j in chosen],
                              [pool.speakers[j].name for j in chosen], rng,
                              rate=data.rate, beta=data.beta,
                              utterances_per_speaker=tuple(data.utterances_per_speaker),
                              snrs=tuple(data.snrs), rir=data.rir)
      extra = {"audio": np.round(mix.audio * 32767).astype(np.int16)} if i < keep_audio else {}
      tmp = f"{path}.{os.getpid()}.tmp.npz"
      np.savez(tmp, features=features_of(mix.audio, cfg),
               segments=np.array(mix.segments, np.float64).reshape(-1, 3),
               speakers=np.array(mix.speakers), snr_db=mix.snr_db, rate=data.rate,
               num_samples=len(mix.audio), **extra)
      os.replace(tmp, path)
    console.progress(f"mixtures {os.path.basename(directory)}: {i + 1}/{count} "
                     f"({time.perf_counter() - start:.0f} s)", final=i + 1 == count)
  return paths


@dataclasses.dataclass(frozen=True)
class Crops:
  """Training batches: random grids (K windows of C frames) cut from random recordings,
  with speaker labels at the model's output rate. Batch `step` depends on the step alone,
  so a resumed run sees the batches an uninterrupted one would."""
  recordings: list[Recording]
  batch_size: int
  window_frames: int
  windows: int
  subsample: int
  hop_s: float
  seed: int
  windows_prev: int = 0
  start_share: float = 0.1  # of grids that begin before their recording (as its first do)
  # Each grid keeps a random context: 1..windows_prev windows before the current one and
  # 0..windows_ahead after it (the rest masked), so that one model can be swept over the
  # window count and the lookahead at inference.
  random_context: bool = False

  def __post_init__(self):
    steps = self.window_frames // self.subsample
    object.__setattr__(self, "labels", [
        r.labels(-(-len(r.features) // self.subsample), self.subsample * self.hop_s)
        for r in self.recordings])
    object.__setattr__(self, "steps", steps)

  def __call__(self, step: int) -> dict:
    rng = np.random.default_rng([self.seed, step])
    k, c, sub, steps = self.windows, self.window_frames, self.subsample, self.steps
    dims = self.recordings[0].features.shape[-1]
    speakers = self.labels[0].shape[-1]
    x = np.zeros((self.batch_size, k * c, dims), np.float32)
    y = np.zeros((self.batch_size, k * steps, speakers), np.float32)
    frame_mask = np.zeros((self.batch_size, k * steps), np.float32)
    for b in range(self.batch_size):
      i = rng.integers(len(self.recordings))
      feats, labels = self.recordings[i].features, self.labels[i]
      # start anywhere (a multiple of the output frame); some grids start 1..P whole
      # windows before the recording, as a recording's first grids do
      missing = 0
      if self.windows_prev and rng.random() < self.start_share:
        missing = int(rng.integers(1, self.windows_prev + 1))
        start = 0
      else:  # the current window inside the recording where it is long enough
        last = len(feats) - (self.windows_prev + 1) * c if (
            len(feats) >= (self.windows_prev + 1) * c) else max(0, len(feats) - c)
        start = sub * rng.integers(0, last // sub + 1)
      skip = missing * c  # frames of the grid before the recording
      piece = feats[start:start + k * c - skip]
      x[b, skip:skip + len(piece)] = piece
      out = labels[start // sub:start // sub + k * steps - missing * steps]
      y[b, missing * steps:missing * steps + len(out)] = out
      frame_mask[b, missing * steps:missing * steps + min(len(out), -(-len(piece) // sub))] = 1
    if self.random_context:
      ahead = k - 1 - self.windows_prev
      prev = rng.integers(min(1, self.windows_prev), self.windows_prev + 1, self.batch_size)
      after = rng.integers(0, ahead + 1, self.batch_size)
      offset = np.arange(k)[None] - self.windows_prev
      keep = (offset >= -prev[:, None]) & (offset <= after[:, None])
      frame_mask = (frame_mask.reshape(self.batch_size, k, steps) * keep[..., None]).reshape(
          self.batch_size, k * steps)
      x = (x.reshape(self.batch_size, k, c, dims) * keep[..., None, None]).reshape(x.shape)
    window_mask = frame_mask.reshape(self.batch_size, k, steps).max(-1) > 0
    return {"features": x.reshape(self.batch_size, k, c, dims),
            "window_mask": window_mask,
            "labels": y.reshape(self.batch_size, k, steps, speakers),
            "frame_mask": frame_mask.reshape(self.batch_size, k, steps)}
