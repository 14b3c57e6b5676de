"""The notebooks' output layer, ``y_t = softmax(W a_t + b)``, run by the engine on each block
of steps as they are made (so that no ``(T, m, n_a)`` stack of hidden states is needed just to
predict)."""

from __future__ import annotations

from typing import Any, NamedTuple

from .activations import _softmax


class SoftmaxHead(NamedTuple):
    """The output layer whose weight and bias are ``params[W]`` ``(n_y, n_a)`` and
    ``params[b]`` ``(n_y, 1)``.

    The engine keeps a copy of :attr:`keys` with the cell's parameters and calls the head on
    every block of hidden states it makes.
    """

    W: str
    b: str

    @property
    def keys(self) -> tuple[str, str]:
        """The parameter keys the head reads."""
        return (self.W, self.b)

    def __call__(self, params: Any, a: Any, *, xp: Any) -> Any:
        """The prediction of the hidden states ``a (k, m, n_a)``: ``(k, m, n_y)``."""
        k, m, n_a = a.shape
        WyT = xp.matrix_transpose(params[self.W])
        logits = xp.reshape(a, (k * m, n_a)) @ WyT + xp.matrix_transpose(params[self.b])
        y = _softmax(logits, -1, xp=xp)
        return xp.reshape(y, (k, m, WyT.shape[1]))
