"""Checkpoints made by other tools: reading timm train.py folders, Hub folders, Lightning .ckpt and plain
state dicts without running anything they name (reading), what model and preprocessing they were
built and fed with (settings: kwargs compared resolved, a ViT's position-embedding grid, image size and
mean/std), fitting their tensors to soup's model, timm's or soup's key layout under any prefix (layouts),
pretrained starts that fail at once offline (offline), and writing them as soup ingredients with their
start and provenance (importing, `soup import`).
"""
