"""Data: the course's image folders and test images (folders), generated sketches (sketches), random
augmentation on the device and mixup/cutmix (augment), and the plain training pipeline every data
path shares: epoch order, per-rank share, decode-every-epoch loaders (pipeline); and where a
command may write (outputs): never into the data, an ingredient's folder or over an input.
"""
