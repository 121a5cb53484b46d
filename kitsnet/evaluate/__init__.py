"""Stage ``evaluate`` (rules/evaluate.smk): the KiTS21 metrics (Dice and Surface Dice of
the hierarchical classes) and scoring of prediction folders.

Imports: may import kitsnet.core, kitsnet.stages and kitsnet.data; see
tests/unit/test_architecture.py.
"""
