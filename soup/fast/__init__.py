"""Fast data paths: skip the work a soup study repeats, with results equal to the plain path's.

One module per job, each importing only the ones above it:
  store    the memory-mapped on-disk store (header, CRC, atomic create, stale clean-up, a folder's budget
           with least-recently-used eviction) and where it lives
  decoded  every image of a folder decoded and resized once into a uint8 store; normalising on the device
  prefix   a ViT cut after its frozen blocks, the prefix's tokens computed once, the suffix that trains
  scorer   scoring weights from those stores (each epoch's val pass, and cooking's selection)
  build    the pipeline builder: the fastest path valid for a recipe, else soup.data.pipeline.plain_pipeline
"""
