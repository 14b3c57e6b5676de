"""A communicator of threads in one process, for testing what :func:`xlstm.fit` does with
the protocol of :mod:`xlstm.distributed` without MPI: ``run_ranks(size, fn)`` calls
``fn(comm)`` on ``size`` threads, each with its own :class:`ThreadComm`, and returns the
results (or the exceptions) by rank. Its collectives meet at a barrier that gives up after
``timeout`` seconds; the mean is summed in rank order, so every rank gets the same bits.
"""

from __future__ import annotations

import threading

import numpy as np

from xlstm._lib.compat import device_of, namespace, to_host
from xlstm._lib.tree import flatten, unflatten


class _Group:
    def __init__(self, size, timeout):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots = [None] * size


class ThreadComm:
    """One rank of a :class:`_Group`: ``rank``, ``size``, ``allreduce_mean``,
    ``broadcast`` and ``barrier``."""

    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, group.size
        self.calls = 0

    def _exchange(self, tree):
        leaves = flatten(tree, "tree")
        self.group.slots[self.rank] = {k: np.array(to_host(v)) for k, v in leaves.items()}
        self.group.barrier.wait()
        slots = list(self.group.slots)
        self.group.barrier.wait()  # everyone has read the slots before they are reused
        self.calls += 1
        return leaves, slots

    @staticmethod
    def _back(tree, leaves, values):
        out = {}
        for k, v in leaves.items():
            xp = namespace(leaf=v)
            out[k] = xp.asarray(values[k], dtype=v.dtype, device=device_of(v))
        return unflatten(tree, out)

    def allreduce_mean(self, tree):
        leaves, slots = self._exchange(tree)
        total = {k: sum(s[k] for s in slots) / self.size for k in leaves}
        return self._back(tree, leaves, total)

    def broadcast(self, tree, root=0):
        leaves, slots = self._exchange(tree)
        return self._back(tree, leaves, slots[root])

    def barrier(self):
        self.group.barrier.wait()


def run_ranks(size, fn, timeout=20.0):
    """``fn(comm)`` on ``size`` threads; a list of each rank's result or exception."""
    group = _Group(size, timeout)
    results = [None] * size

    def target(rank):
        try:
            results[rank] = fn(ThreadComm(group, rank))
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            results[rank] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 10)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results
