"""Pure tensor math: quantization, factorizations, errors from statistics, rank search.

Nothing here knows about modules, files or logging.
"""
