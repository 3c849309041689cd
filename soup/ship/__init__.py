"""What leaves soup for elsewhere, after judge has measured it: the submission file in one of the
formats of its name->writer map (submit), the exported folder timm loads (export; card its model card,
staging its swap into place in one step). The stage behind `soup submit` and `soup export` (soup.cli.ship).
"""
