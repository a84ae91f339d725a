"""Evaluation: pure metrics and statistics (ICC, Dice, challenge metrics, OLS, intervals, OOD).

Nothing here restores a network or writes a report: that is :mod:`wmh_jax.study`.
"""
