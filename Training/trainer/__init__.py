"""Headless StarGAN v2 trainer (baseline and texture-aware): config, losses, distributed helpers,
checkpoints, monitoring and the training loop. The command line is `Training/train.py`."""
