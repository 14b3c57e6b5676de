"""Training: optimisers and clipping (``optim``) and the training loop (``fit``)."""
