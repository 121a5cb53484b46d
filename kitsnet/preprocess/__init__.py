"""Stage ``preprocess`` (rules/preprocess.smk): per-case cropping to non-zero, resampling
and CT normalisation to the plan's grid, and the cascade's region-of-interest crops.

Imports: may import kitsnet.core, kitsnet.stages, kitsnet.data and kitsnet.plan; see
tests/unit/test_architecture.py.
"""
