"""Diarization error rate, scored by pyannote.metrics (`pip install -e '.[speech]'`).

DER = (missed speech + false alarm + speaker confusion) / total reference speech, under
the optimal one-to-one mapping of hypothesis to reference speakers. Overlapped speech is
scored. pyannote's `collar` is the total width of the no-score zone around each
reference boundary, so its 0.5 s equals md-eval's 0.25 s (`-c 0.25`). A speaker's
overlapping segments are merged before scoring.
"""
import numpy as np

COLLARS = (0.0, 0.5)


def annotation(segments, names=None):
  """A pyannote `Annotation` of (speaker, start s, end s) segments, each speaker's
  overlapping segments merged."""
  from pyannote.core import Annotation, Segment  # noqa: PLC0415
  out = Annotation()
  for i, (speaker, start, end) in enumerate(segments):
    if end > start:
      out[Segment(float(start), float(end)), i] = names[speaker] if names else speaker
  return out.support()


class Scorer:
  """Accumulates DER components over recordings, at each collar in `collars`."""

  def __init__(self, collars=COLLARS):
    from pyannote.metrics.diarization import DiarizationErrorRate  # noqa: PLC0415
    self.metrics = {c: DiarizationErrorRate(collar=c, skip_overlap=False) for c in collars}
    self.per_recording: list[dict] = []

  def add(self, reference_segments, hypothesis_segments, duration: float) -> dict:
    """Score one recording of `duration` seconds (the scored extent); returns its
    components at each collar ({collar: dict})."""
    from pyannote.core import Segment, Timeline  # noqa: PLC0415
    ref, hyp = annotation(reference_segments), annotation(hypothesis_segments)
    uem = Timeline([Segment(0.0, float(duration))])
    out = {}
    for collar, metric in self.metrics.items():
      components = metric(ref, hyp, uem=uem, detailed=True)
      out[collar] = {k: float(components[k]) for k in (
          "missed detection", "false alarm", "confusion", "total")}
    self.per_recording.append(out)
    return out

  def der(self, collar: float) -> float:
    return float(abs(self.metrics[collar]))

  def bootstrap(self, collar: float, samples: int = 1000, seed: int = 0,
                level: float = 0.95) -> tuple[float, float]:
    """A percentile bootstrap interval of the pooled DER over recordings."""
    errors, totals = error_totals(self.per_recording, collar)
    return bootstrap_ratio(errors, totals, samples, seed, level)


def error_totals(per_recording: list[dict], collar: float) -> tuple[np.ndarray, np.ndarray]:
  errors = np.array([r[collar]["missed detection"] + r[collar]["false alarm"]
                     + r[collar]["confusion"] for r in per_recording])
  return errors, np.array([r[collar]["total"] for r in per_recording])


def bootstrap_ratio(errors, totals, samples: int = 1000, seed: int = 0, level: float = 0.95,
                    errors_b=None, totals_b=None) -> tuple[float, float]:
  """Percentile interval of sum(errors)/sum(totals) over recordings resampled with
  replacement; with `errors_b`/`totals_b` (the same recordings, another system), of the
  ratio of the two DERs."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(errors), (samples, len(errors)))
  stat = errors[idx].sum(1) / np.maximum(totals[idx].sum(1), 1e-12)
  if errors_b is not None:
    stat = stat / np.maximum(errors_b[idx].sum(1) / np.maximum(totals_b[idx].sum(1), 1e-12),
                             1e-12)
  lo, hi = np.quantile(stat, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)
