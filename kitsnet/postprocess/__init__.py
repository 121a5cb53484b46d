"""Stage ``postprocess`` (rules/postprocess.smk): what nnU-Net users run after
cross-validation.  Connected-component postprocessing of label maps, decided on the
cross-validation predictions as nnU-Net decides it (greedy: a candidate is kept only where it
raises the mean Dice of KiTS21's regions), with candidates that make sense for two kidneys.

Modules: :mod:`~kitsnet.postprocess.components` (26-connected components with bounded memory),
:mod:`~kitsnet.postprocess.candidates` (the candidate steps and the learned minimum volume),
:mod:`~kitsnet.postprocess.apply` (:func:`~kitsnet.postprocess.apply.apply_steps`, used by the
workflow and ``kitsnet predict``), :mod:`~kitsnet.postprocess.crops` (each case as compressed
crops, Dice from them) and :mod:`~kitsnet.postprocess.decide` (the greedy decision, the full
KiTS21 scores of a model, the decision JSON and the per-case CSV); then
:mod:`~kitsnet.postprocess.selection` (every configuration and pair, with and without
postprocessing, and the best of them) and ``kitsnet predict``, which follows that choice on new
scans (:mod:`~kitsnet.postprocess.predict_best`; its options in
:mod:`~kitsnet.postprocess.predict_cli`, torch-free).

Imports: may import kitsnet.core, kitsnet.stages, kitsnet.data, kitsnet.plan,
kitsnet.preprocess, kitsnet.model, kitsnet.predict and kitsnet.evaluate; see
tests/unit/test_architecture.py.
"""
