"""Scoring weights on a split and comparing the results: the evaluator shared by cooking and the
reports (evaluator), bootstrap intervals, McNemar, ECE (stats), paired differences and the soup vs
best-ingredient verdict (compare), and temperature scaling (calibrate). Cooking selects with it,
so it sits upstream of soup.cook.
"""
