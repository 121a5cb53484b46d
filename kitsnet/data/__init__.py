"""Stage ``data`` (rules/data.smk): KiTS layouts and their validation, the synthetic
KiTS-like demo dataset and the resumable fetch of the imaging.

Imports: may import kitsnet.core and kitsnet.stages; see tests/unit/test_architecture.py.
"""
