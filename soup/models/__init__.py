"""Models and their files: building a backbone + head by name (backbones), checkpoints written
atomically with their metadata (checkpoint; its weights checked finite as they are read), that metadata
typed as records, parsed once at read and dumped once at write (records), checked field by field where it
is read (metadata), and running a model: the device's precision and
autocast (precision), torchrun ranks (distributed), batched prediction and its scores
(inference, metrics); the start soup ships, pretrained by the project (starts).
"""
