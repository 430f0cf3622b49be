"""Train the 3D U-Net: `python -m experiments.unet3d --config=experiments/configs/unet3d.py:demo --workdir=runs/unet3d`.

The trainer is `experiments/trainers/unet3d.py`.
"""
from experiments.trainers import entry

if __name__ == "__main__":
  entry.main("unet3d", "experiments/configs/unet3d.py:demo", "runs/unet3d")
