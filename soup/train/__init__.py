"""Training: the sweep driver that trains a recipe's ingredients in turn (sweep), the loop that fine-tunes
each ingredient from set-up to finish (loop), an ingredient's folder with its lock, saved state and resume
checks (state), lr schedules, layer decay and EMA (schedule), and the probed start shared by a sweep (probe).
"""
