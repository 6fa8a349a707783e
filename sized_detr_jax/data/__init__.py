"""Datasets, augmentation and the static-shape input pipeline."""
