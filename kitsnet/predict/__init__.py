"""Stage ``predict`` (rules/predict.smk): the Gaussian sliding window, export to the
original grid and prediction of folds and new images.

Imports: may import every package before it, not kitsnet.train; see tests/unit/test_architecture.py.
"""
