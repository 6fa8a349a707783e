"""Detector models (ResNet backbone, deformable transformer, DINO, Co-DINO)."""
