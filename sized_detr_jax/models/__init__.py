"""Detector models (ResNet backbone, deformable transformer, DINO, Co-DINO).

DINO-4scale (dino.py) is built from resnet.py (frozen-BN ResNet), position_encoding.py (sine
embeddings), msda.py (deformable attention sampling core, replaceable kernel), layers.py,
deformable_transformer.py (encoder, mixed query selection, refining decoder + shared heads) and
denoising.py (static-shape contrastive denoising). testing.py fills random params cheaply.
"""
