"""Stage ``plan`` (rules/plan.smk): the dataset fingerprint, nnU-Net's topology rule, the
per-configuration plans and the cross-validation splits.  Every number a later stage uses
comes from the plan file this stage writes.

Modules: :mod:`~kitsnet.plan.fingerprint` (the dataset's statistics),
:mod:`~kitsnet.plan.topology` (nnU-Net's rule), :mod:`~kitsnet.plan.planner` (the plans) and
:mod:`~kitsnet.plan.splits` (the cross-validation folds).

Imports: may import kitsnet.core, kitsnet.stages and kitsnet.data; see
tests/unit/test_architecture.py.
"""
