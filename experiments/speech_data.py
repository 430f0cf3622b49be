r"""Write a diarization config's data ahead of training: the pseudo-speakers' utterances
(text-to-speech, once per speaker) and the simulated mixtures of every split.

    python -m experiments.speech_data --config=experiments/configs/diarization.py:tts

Utterances go to `data.utterances` (one file per pseudo-speaker, engine x voice x rate x
pitch), mixtures to `data.path/{train,val,test,variants}` (one file per mixture: MFCC
frames and speaker segments). Both resume where they stopped and show progress. Prints,
per split, the mixtures, their hours, speakers and the overlap ratio (the share of
speech where two or more speak).

The engines are Debian's: `apt-get install -y espeak-ng flite festival festvox-kallpc16k
festvox-us-slt-hts` (`python3 dev.py test` installs them where it runs as root); a
missing one is named with its install command.
"""
from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/diarization.py:tts", "Diarization config.")


def main(argv):
  del argv
  from experiments.trainers import diarization as trainer  # noqa: PLC0415
  from sdl.data import mixtures  # noqa: PLC0415
  from sdl.errors import UserError  # noqa: PLC0415
  config = _CONFIG.value
  try:
    trainer.validate(config)
    trainer.write_utterances(config)
    for split in trainer.SPLITS:
      recordings = trainer.load_split(config, split, keep_audio=4 if split != "train" else 0)
      if not recordings:
        continue
      hours = sum(r.seconds for r in recordings) / 3600
      frame_s = config.features.hop_s
      labels = [r.labels(len(r.features), frame_s) for r in recordings]
      active = sum(float((y.sum(-1) > 0).sum()) for y in labels)
      overlap = sum(mixtures.overlap_ratio(y) * float((y.sum(-1) > 0).sum())
                    for y in labels) / max(active, 1)
      names = {n for r in recordings for n in r.speakers}
      print(f"{split}: {len(recordings)} mixtures, {hours:.2f} h, {len(names)} speakers, "
            f"overlap ratio {overlap:.3f}, SNR {sorted(set(r.snr_db for r in recordings))} dB",
            flush=True)
  except UserError as error:
    raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
  app.run(main)
