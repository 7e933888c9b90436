"""The index on disk and its public structure: stored spots and photos, the codec, cells, prototypes, calibration."""
