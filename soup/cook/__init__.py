"""Cooking soups: the compatibility checks and writing a soup with its provenance (cooking), the soup
methods and their one registry (methods: a new method is one decorated function there), the machinery
behind some of them (greedy: ranking and the greedy step; learned: fitting coefficients, on the prefix
cache where it applies, and the hyperplane's block coordinate descent), every method at once with the
winner kept (best), the held-out judge of each weight set (selector), weight arithmetic and the rebuilt
start (weights), why a soup chose what it chose (diagnose, `soup inspect`) and where a sweep stands
(sweeps).
"""
