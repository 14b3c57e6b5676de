"""What the notebook APIs (:mod:`xlstm.lstm`, :mod:`xlstm.rnn`) share: their caches.

A sequence's ``caches`` is the notebook's pair ``(list of per-step caches, x)``. Here the
per-step caches are built on access, as views into the engine's stacked forward state,
which the pair carries as ``.state`` for the fused backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._compat import namespace


class StepCaches(Sequence):
    """The per-step caches of a sequence, built on access as views into the stacked state.

    Subclasses define :meth:`step`, the cache of step ``t`` (``0 <= t < len(self)``).
    """

    def __init__(self, state, xp=None):
        self._state = state
        self._xp = namespace(caches=state.A) if xp is None else xp

    def __reduce__(self):  # the namespace (a module) is found again from the arrays
        return (type(self), (self._state,))

    def __len__(self):
        return self._state.A.shape[0] - 1

    def __getitem__(self, t):
        if isinstance(t, slice):
            return [self[k] for k in range(*t.indices(len(self)))]
        T = len(self)
        if not -T <= t < T:
            raise IndexError(f"step {t} is out of range for a sequence of {T} steps")
        return self.step(t % T)

    def step(self, t):
        raise NotImplementedError


class SequenceCaches(tuple):
    """The notebook's pair ``(caches, x)``, carrying the stacked forward state as
    :attr:`state`. It can be copied (``copy.copy``, ``copy.deepcopy``) and pickled, as far
    as the arrays of its namespace can."""

    def __new__(cls, steps, x, state):
        obj = super().__new__(cls, (steps, x))
        obj.state = state
        return obj

    def __reduce__(self):  # copy, deepcopy and pickle rebuild it from its three parts
        return (type(self), (self[0], self[1], self.state))
