"""Training: episode sources, augmentation, losses, the training loop and checkpoints."""
