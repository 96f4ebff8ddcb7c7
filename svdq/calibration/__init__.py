"""Calibration: the text, the statistics of each layer's inputs, and the gradients."""
