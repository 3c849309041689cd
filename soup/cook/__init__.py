"""Cooking soups: the compatibility checks and writing a soup with its provenance (cooking), the soup
methods (methods: a new method is one decorated function there) and their one registry, where each method
declares its options and `soup cook`, `--best` and the demo read them (registry), the machinery
behind some of them (greedy: ranking and the greedy step; learned: fitting coefficients, on the prefix
cache where it applies, and the hyperplane's block coordinate descent), every method at once with the
winner kept (best), the held-out judge of each weight set (selector), weight arithmetic and the rebuilt
start (weights), why a soup chose what it chose (diagnose, `soup inspect`) and where a sweep stands
(sweeps).
"""
