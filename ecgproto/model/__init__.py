"""The multi-branch prototype network: backbones, prototype layers, branches, fusion, the baseline."""
