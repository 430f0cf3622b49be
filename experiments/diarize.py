r"""Who speaks when in your recording: diarize a WAV file with a trained model.

    python -m experiments.diarize --wav=FILE [--out=FILE.rttm] [--checkpoint=DIR] [--stream]

`--wav`: any sample rate, mono or stereo (channels are averaged), 16-, 24- or 32-bit PCM
or float. `--out` (default: the file's name with `.rttm`): NIST RTTM, one line a speaker
turn, which md-eval, dscore and pyannote.metrics score. `--checkpoint`: a model
directory (`model.json`, `params.npz`; default: the small model shipped in
`experiments/models/diarization`) or a training workdir, exported on the fly;
`--export=DIR` writes a training workdir's model as such a directory. `--stream` runs the
streaming path (window by window, as audio would arrive) instead of the whole file at
once; the two give the same turns.

Prints each speaker's talk time, and the real-time factor (compute seconds per second of
audio; compile apart) to stderr.
"""
import os
import sys
import time

from absl import app, flags, logging

from experiments.trainers import entry
from experiments.trainers.diarization import SHIPPED

_WAV = flags.DEFINE_string("wav", None, "Audio file to diarize.")
_OUT = flags.DEFINE_string("out", None, "RTTM to write (default: <wav>.rttm).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", SHIPPED,
                                  "Model directory or training workdir.")
_EXPORT = flags.DEFINE_string("export", None, "Write --checkpoint's model here and stop.")
_STREAM = flags.DEFINE_bool("stream", False, "Streaming inference, window by window.")


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  from experiments.trainers import diarization as trainer  # noqa: PLC0415
  from sdl.data import diarization as data  # noqa: PLC0415
  from sdl.data import speech  # noqa: PLC0415
  from sdl.errors import UserError  # noqa: PLC0415
  from sdl.train import diarize  # noqa: PLC0415
  try:
    model_dir = entry.model_directory(_CHECKPOINT.value, _EXPORT.value, trainer.export)
    if model_dir is None:
      return
    if not _WAV.value:
      raise trainer.ConfigError("--wav=FILE: the recording to diarize")
    predict, config, spec = trainer.load_exported(model_dir)
    audio = speech.read_audio(_WAV.value, config.features.rate)
    cfg = data.mfcc_config(config.features)
    seconds = len(audio) / config.features.rate
    # compile apart: one grid of silence through the same shapes
    x, mask = diarize.grids(diarize.cut_windows(
        data.features_of(audio[:cfg.sample_rate], cfg), spec), spec, [0])
    predict(x, mask)
    t = time.perf_counter()
    if _STREAM.value:
      streamer = diarize.Streamer(predict, spec, cfg, data.mfcc_function(cfg))
      window = spec.window_frames * cfg.hop_length
      for start in range(0, len(audio), window):
        streamer.push(audio[start:start + window])
      streamer.finish()
      activity = streamer.activity()
    else:
      activity = diarize.diarize(data.features_of(audio, cfg), predict, spec,
                                 config.eval.batch)
    took = time.perf_counter() - t
    activity = diarize.median_filter(activity, config.eval.median)
    frame_s = spec.subsample * config.features.hop_s
    turns = diarize.segments(activity, frame_s, config.eval.threshold)
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  out = _OUT.value or os.path.splitext(_WAV.value)[0] + ".rttm"
  recording = os.path.splitext(os.path.basename(_WAV.value))[0]
  diarize.write_rttm(out, recording, turns)
  for speaker in sorted({s for s, _, _ in turns}):
    talk = sum(e - b for s, b, e in turns if s == speaker)
    print(f"spk{speaker}: {talk:.1f} s in {sum(s == speaker for s, _, _ in turns)} turns")
  print(f"{seconds:.1f} s of audio, {len(turns)} turns -> {out}; real-time factor "
        f"{took / seconds:.4f} ({'streaming' if _STREAM.value else 'whole file'})",
        file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
