"""The network (nnU-Net's PlainConvUNet, built from a plan's ``arch``) and checkpoints:
shared by training and prediction, below both.

Imports: may import kitsnet.core, kitsnet.stages and the stages before training; see
tests/unit/test_architecture.py.
"""
