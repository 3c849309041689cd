"""What users read and ship: the eval table's rows and ensembles (evaluate), tables and their honesty
footnotes (report), `soup cook --best`'s verdict tables (verdict), the draws that ended below their
start (study), the submission CSV (submit), the pictures (plot), and the exported folder (export; card
its model card, staging its swap into place in one step).
"""
