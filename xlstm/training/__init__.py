"""Training: optimisers and clipping (``optim``), the training loop (``fit``) and its
callbacks (``callbacks``): validation, early stopping, checkpoints, a progress bar.

The loop itself is :func:`xlstm.fit` (``xlstm.training.fit.fit``: the name ``fit`` here is
its module); the rest of its names are here.
"""

from .callbacks import (
    BeginInfo,
    Callback,
    Checkpoint,
    EarlyStopping,
    EndInfo,
    EvalInfo,
    ProgressBar,
    StepInfo,
)
from .fit import EvalRecord, FitResult, StepRecord
from .losses import accuracy

__all__ = [
    "FitResult",
    "StepRecord",
    "EvalRecord",
    "accuracy",
    "Callback",
    "ProgressBar",
    "Checkpoint",
    "EarlyStopping",
    "BeginInfo",
    "StepInfo",
    "EvalInfo",
    "EndInfo",
]
