"""What users read: the eval table's rows and ensembles (evaluate), tables and their honesty footnotes
(report), `soup cook --best`'s verdict tables (verdict), the draws that ended below their start (study) and
the pictures (plot). What is shipped (the submission, the export) is soup.ship's.
"""
