"""Train a diarizer: `python -m experiments.diarization --config=experiments/configs/diarization.py:smoke --workdir=runs/diarization_smoke`.

The trainer is `experiments/trainers/diarization.py`; the variants are in the config file.
"""
from experiments.trainers import entry

if __name__ == "__main__":
  entry.main("diarization", "experiments/configs/diarization.py:tts", "runs/diarization")
