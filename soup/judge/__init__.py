"""What users read and ship: the eval table's rows and ensembles (evaluate), tables and their
honesty footnotes (report), the submission CSV (submit) and the pictures (plot).
"""
