"""ECG data: WFDB reading, dataset layouts, labels, preprocessing, the cached array store, demo data."""
