"""Stage ``report`` (rules/report.smk): Table 1, its statistics, the figures and the
compute cost.

Imports: may import every package before it; see tests/unit/test_architecture.py.  Its jobs
run in envs/report.yaml, which has neither torch nor surface-distance, so only modules that
import neither may be imported from here (from training: :mod:`kitsnet.train.training_log`);
tests/unit/report/test_report_env.py checks it.
"""
