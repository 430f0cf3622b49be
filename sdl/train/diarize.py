"""Diarization inference: recordings cut into grids of windows, the model's window
predictions stitched into one speaker-consistent activity, whole-file or streaming.

A recording's feature frames `[frames, features]` are cut into windows of `C` frames
(the last zero-padded). Window n is predicted from its grid: windows n - P .. n + L
(P = `windows_prev`, L = `windows_ahead`; windows beyond the ends masked). Each grid's
speaker slots are arbitrary (training is permutation-free), so before window n is emitted
its slots are permuted to agree best with what was already emitted for windows
n - P .. n - 1, which its grid predicts too (a speaker-tracing buffer, after Xue et al.,
Interspeech 2021). With P = 0 nothing is shared and no permutation is sought.

`diarize` runs every grid of a file in batches; `Streamer` runs one grid as soon as its
lookahead has arrived, from audio pushed in pieces. Both give the same activity (the test
suite checks it): a window's latency is its own length, the lookahead, and one grid's
compute.
"""
import dataclasses
import itertools
import os
from collections.abc import Callable

import numpy as np

from sdl.ops import mfcc as mfcc_lib


@dataclasses.dataclass(frozen=True)
class GridSpec:
  window_frames: int   # C: feature frames a window
  windows_prev: int    # P
  windows_ahead: int   # L
  subsample: int       # feature frames per output frame

  @property
  def windows(self) -> int:
    return self.windows_prev + 1 + self.windows_ahead

  @property
  def steps(self) -> int:
    return self.window_frames // self.subsample


def cut_windows(features: np.ndarray, spec: GridSpec) -> np.ndarray:
  """[windows, C, features]: `features` [frames, features] cut into windows, the last
  zero-padded."""
  count = max(1, -(-len(features) // spec.window_frames))
  padded = np.zeros((count * spec.window_frames, features.shape[-1]), np.float32)
  padded[:len(features)] = features
  return padded.reshape(count, spec.window_frames, -1)


def grids(windows: np.ndarray, spec: GridSpec, centres) -> tuple[np.ndarray, np.ndarray]:
  """(features [len(centres), K, C, F], window_mask [len(centres), K]): the grids of the
  windows in `centres`."""
  index = np.asarray(centres)[:, None] - spec.windows_prev + np.arange(spec.windows)[None]
  valid = (index >= 0) & (index < len(windows))
  out = windows[np.clip(index, 0, len(windows) - 1)] * valid[..., None, None]
  return out.astype(np.float32), valid


def best_permutation(reference: np.ndarray, predicted: np.ndarray) -> tuple[int, ...]:
  """The permutation of `predicted`'s last axis (speakers) closest to `reference` in L1."""
  speakers = predicted.shape[-1]
  perms = list(itertools.permutations(range(speakers)))
  if reference.size == 0:
    return perms[0]
  costs = [np.abs(reference - predicted[..., list(p)]).sum() for p in perms]
  return perms[int(np.argmin(costs))]


class Stitcher:
  """Emits windows in order, each permuted to agree with those already emitted."""

  def __init__(self, spec: GridSpec):
    self.spec = spec
    self.emitted: list[np.ndarray] = []  # [steps, speakers] per window

  def add(self, probs: np.ndarray) -> np.ndarray:
    """`probs` [K, steps, speakers]: the grid of the next window; returns that window's
    activity probabilities [steps, speakers], permuted."""
    n, p = len(self.emitted), self.spec.windows_prev
    have = min(p, n)
    reference = np.stack(self.emitted[n - have:]) if have else np.zeros((0,))
    perm = best_permutation(reference, probs[p - have:p]) if have else tuple(
        range(probs.shape[-1]))
    out = probs[p][:, list(perm)]
    self.emitted.append(out)
    return out

  def activity(self) -> np.ndarray:
    return np.concatenate(self.emitted) if self.emitted else np.zeros((0, 0), np.float32)


Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (grids, masks) -> probs


def diarize(features: np.ndarray, predict: Predict, spec: GridSpec, batch: int = 32
            ) -> np.ndarray:
  """[windows * steps, speakers] activity probabilities of a recording's `features`
  [frames, features], every grid run in batches of `batch` (padded, so one compile)."""
  windows = cut_windows(features, spec)
  stitch = Stitcher(spec)
  for start in range(0, len(windows), batch):
    centres = np.arange(start, min(start + batch, len(windows)))
    x, mask = grids(windows, spec, np.pad(centres, (0, batch - len(centres)), mode="edge"))
    probs = np.asarray(predict(x, mask))
    for i in range(len(centres)):
      stitch.add(probs[i])
  return stitch.activity()


class Streamer:
  """Streaming diarization of audio pushed in pieces of any size: each window is emitted
  once its lookahead windows' audio has arrived (`push` returns the windows emitted),
  `finish` emits the rest as `diarize` does at the end of a file."""

  def __init__(self, predict: Predict, spec: GridSpec, features_cfg: mfcc_lib.MfccConfig,
               features: Callable):
    self.predict, self.spec, self.cfg, self.features = predict, spec, features_cfg, features
    self.stitch = Stitcher(spec)
    self.samples = np.zeros(0, np.float32)  # not yet framed (from `offset`)
    self.offset = 0                         # absolute index of samples[0]
    self.previous = None                    # the sample before samples[0]
    self.frames: list[np.ndarray] = []      # feature frames so far
    self.windows: list[np.ndarray] = []     # complete windows so far

  def _frames_ready(self, final: bool) -> None:
    hop, length = self.cfg.hop_length, self.cfg.frame_length
    if final:
      count = mfcc_lib.num_frames(len(self.samples), self.cfg) if len(self.samples) else 0
      use = len(self.samples)
    else:
      count = (len(self.samples) - length) // hop + 1 if len(self.samples) >= length else 0
      use = (count - 1) * hop + length if count else 0
    if count:
      prev = None if self.previous is None else np.float32(self.previous)
      feats = np.asarray(self.features(self.samples[:use], prev))
      self.frames.extend(feats[:count])
      consumed = count * hop
      if consumed:
        self.previous = self.samples[consumed - 1] if consumed <= len(self.samples) else 0.0
      self.samples = self.samples[consumed:]
      self.offset += consumed
    c = self.spec.window_frames
    while len(self.frames) >= c:
      self.windows.append(np.stack(self.frames[:c]))
      del self.frames[:c]

  def _emit(self, total: int | None) -> list[np.ndarray]:
    out = []
    while True:
      n = len(self.stitch.emitted)
      if total is None and n + self.spec.windows_ahead >= len(self.windows):
        return out
      if total is not None and n >= total:
        return out
      x, mask = grids(np.stack(self.windows), self.spec, [n])  # masks past the end
      out.append(self.stitch.add(np.asarray(self.predict(x, mask))[0]))

  def push(self, audio: np.ndarray) -> list[np.ndarray]:
    self.samples = np.concatenate([self.samples, np.asarray(audio, np.float32)])
    self._frames_ready(final=False)
    return self._emit(None)

  def finish(self) -> list[np.ndarray]:
    self._frames_ready(final=True)
    if self.frames:  # the last, partial window, zero-padded as `cut_windows` pads it
      last = np.zeros((self.spec.window_frames, len(self.frames[0])), np.float32)
      last[:len(self.frames)] = np.stack(self.frames)
      self.windows.append(last)
      self.frames = []
    if not self.windows:
      return []
    total = len(self.windows)
    return self._emit(total)

  def activity(self) -> np.ndarray:
    return self.stitch.activity()


def median_filter(activity: np.ndarray, width: int) -> np.ndarray:
  """Each speaker's activity [frames, speakers] median-filtered over `width` (odd) frames."""
  if width <= 1:
    return activity
  half = width // 2
  padded = np.pad(activity, ((half, half), (0, 0)), mode="edge")
  stacked = np.lib.stride_tricks.sliding_window_view(padded, width, axis=0)
  return np.median(stacked, axis=-1)


def segments(activity: np.ndarray, frame_s: float, threshold: float = 0.5
             ) -> list[tuple[int, float, float]]:
  """(speaker, start s, end s) of each run of `activity` [frames, speakers] above
  `threshold`, frame i spanning [i, i + 1) * frame_s."""
  out = []
  on = np.pad(activity > threshold, ((1, 1), (0, 0)))
  for speaker in range(activity.shape[1]):
    edges = np.flatnonzero(np.diff(on[:, speaker].astype(np.int8)))
    out += [(speaker, s * frame_s, e * frame_s) for s, e in zip(edges[::2], edges[1::2])]
  return sorted(out, key=lambda x: (x[1], x[0]))


def write_rttm(path: str, recording: str, segs, names=None) -> None:
  """NIST RTTM: one `SPEAKER <file> 1 <start> <duration> <NA> <NA> <speaker> <NA> <NA>`
  line a segment (what md-eval, dscore and pyannote read)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    for speaker, start, end in segs:
      name = names[speaker] if names else f"spk{speaker}"
      f.write(f"SPEAKER {recording} 1 {start:.3f} {end - start:.3f} <NA> <NA> {name} "
              "<NA> <NA>\n")
  os.replace(tmp, path)


def read_rttm(path: str) -> dict[str, list[tuple[str, float, float]]]:
  """{recording: [(speaker, start, end)]} from an RTTM file."""
  out: dict = {}
  with open(path) as f:
    for line in f:
      fields = line.split()
      if fields and fields[0] == "SPEAKER":
        start, duration = float(fields[3]), float(fields[4])
        out.setdefault(fields[1], []).append((fields[7], start, start + duration))
  return out
