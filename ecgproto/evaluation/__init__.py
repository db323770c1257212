"""Evaluation: whole-fold metrics with one bootstrap (unpaired and paired), calibration and selective
prediction, external validation, the reliability figure, and the champion/challenger comparison."""
