"""Reference implementations used only as yardsticks by tests and benchmarks; not part of the
product (import them as ``tests.reference.<module>``; kitsnet never does)."""
