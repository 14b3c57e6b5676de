"""Losses and metrics on any model's outputs: :func:`softmax_cross_entropy` of logits at every
step, and :func:`accuracy`.

They take a model's outputs (for example a linear head on them) and return the loss and its
gradient with respect to those outputs, whatever the model. The losses that run the notebook
LSTM themselves (:func:`xlstm.sequence_cross_entropy`, :func:`xlstm.last_step_mse`) are in
:mod:`xlstm.losses`. The function is defined in the package's lowest layer, beside the checks
it shares with :func:`xlstm.sequence_cross_entropy`, so that the notebook can use it too.
"""

from __future__ import annotations

from .._lib.checks import check_shape
from .._lib.compat import namespace
from .._lib.cross_entropy import softmax_cross_entropy
from .._lib.typing import Array

__all__ = ["softmax_cross_entropy", "accuracy"]


def accuracy(logits: Array, labels: Array, *, mask: Array | None = None) -> Array:
    """The fraction of positions whose most likely class is the label: a metric for
    ``fit``'s ``eval_fn``.

    Parameters
    ----------
    logits : array, shape (n_y, m, T)
        Scores of every class, example and step (logits or probabilities: only their
        argmax counts; a tie goes to the first class).
    labels : array of integers, shape (m, T)
        The class of every position.
    mask : array, shape (m, T), optional
        Which positions count (boolean) or their weights (floating, of the logits'
        dtype), as in :func:`xlstm.softmax_cross_entropy`. With a model's ``lengths``,
        ``arange(T) < lengths[:, None]`` counts each sequence's steps.

    Returns
    -------
    array, shape ()
        The (weighted) mean of the hits, a 0-d array of the logits' dtype, namespace and
        device (NaN when no position counts).

    Raises
    ------
    TypeError, ValueError
        For arrays of the wrong kind or shape, naming the argument.

    Examples
    --------
    >>> import numpy as np
    >>> from xlstm.training import accuracy
    >>> logits = np.array([[[2.0, 0.0]], [[1.0, 3.0]]])      # (n_y=2, m=1, T=2)
    >>> float(accuracy(logits, np.array([[0, 0]])))          # argmax is (0, 1)
    0.5
    >>> float(accuracy(logits, np.array([[0, 0]]), mask=np.array([[True, False]])))
    1.0
    """
    xp = namespace(logits=logits, labels=labels, mask=mask, optional=("mask",),
                   kinds={"labels": ("integral",), "mask": ("bool",)})
    check_shape("logits", logits, (None, None, None), "(n_y, m, T)")
    _, m, T = logits.shape
    if not xp.isdtype(labels.dtype, "integral"):
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    check_shape("labels", labels, (m, T), "(m, T)")
    best = xp.argmax(logits, axis=0)  # (m, T)
    hit = xp.astype(best == xp.astype(labels, best.dtype), logits.dtype)
    if mask is None:
        return xp.mean(hit)
    check_shape("mask", mask, (m, T), "(m, T)")
    weights = xp.astype(mask, logits.dtype) if xp.isdtype(mask.dtype, "bool") else mask
    return xp.sum(hit * weights) / xp.sum(weights)
