"""Shared lower layer: NIfTI and JSON I/O with atomic writes, the device and its numeric
settings, resampling, the run's settings (config checks and presets) and the step
environments built from this source.

Imports: imports nothing from kitsnet (every other package may import it); see
tests/unit/test_architecture.py.
"""
