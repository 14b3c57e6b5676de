"""Losses on any model's outputs: :func:`softmax_cross_entropy` of logits at every step.

They take a model's outputs (for example a linear head on them) and return the loss and its
gradient with respect to those outputs, whatever the model. The losses that run the notebook
LSTM themselves (:func:`xlstm.sequence_cross_entropy`, :func:`xlstm.last_step_mse`) are in
:mod:`xlstm.losses`. The function is defined in the package's lowest layer, beside the checks
it shares with :func:`xlstm.sequence_cross_entropy`, so that the notebook can use it too.
"""

from __future__ import annotations

from .._lib.cross_entropy import softmax_cross_entropy

__all__ = ["softmax_cross_entropy"]
