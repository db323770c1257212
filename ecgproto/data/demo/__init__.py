"""Synthetic demo datasets in the real PTB-XL and MIMIC-IV-ECG layouts, with planted ground truth."""
