"""Checkpoints made by other tools: reading timm train.py folders, Hub folders, Lightning .ckpt and plain
state dicts without running anything they name (reading), fitting their tensors to soup's model, timm's
or soup's key layout under any prefix (layouts), and writing them as soup ingredients with their start
and provenance (importing, `soup import`).
"""
