"""Stage ``train`` (rules/train.smk): the patch loader (``loader``), the input pipeline
(``pipeline``) and its augmentation (``augment/``), the loss (``loss``), one SGD step and
validation (``steps``), the training log (``training_log``, torch-free: the report reads it)
and the loop over epochs (``loop.train_fold``).

Imports: may import every package before it (core, stages, data, plan, preprocess, model); see
tests/unit/test_architecture.py.
"""
