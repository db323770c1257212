"""Training: configuration, losses, whole-fold metrics, the staged trainer and the stage functions."""
