"""The data-parallel training cases shared by the tests and the MPI worker: small float64
problems whose global batches every rank shards along the batch axis.

``case(kind)`` gives ``(params, batches, loss_fn, shard_batch)``: the starting parameters,
the global batches (a list), the loss function of :func:`xlstm.fit` and
``shard_batch(batch, comm)``, this rank's part of a global batch.
"""

from __future__ import annotations

import numpy as np

import xlstm
from xlstm.distributed import shard

N_X, N_A, N_Y, M, T, BATCHES = 3, 4, 2, 8, 5, 4


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((N_X, M, T)), rng.integers(0, N_Y, (M, T)))
            for _ in range(BATCHES)]


def _shard(batch, comm):
    x, labels = batch
    return shard(x, comm, 1), shard(labels, comm, 0)


def notebook_case():
    """The notebook's LSTM with its softmax head: flat parameters, ``sequence_cross_entropy``
    (the mean over every step of every sequence)."""
    params = xlstm.init_params(N_X, N_A, N_Y, seed=0)

    def loss_fn(params, batch):
        x, labels = batch
        a0 = np.zeros((N_A, x.shape[1]))
        return xlstm.sequence_cross_entropy(x, a0, params, labels)

    return params, _data(), loss_fn, _shard


def model_case():
    """A 2-layer ``xlstm.MLSTM`` with a linear softmax head: a parameter tree."""
    model = xlstm.MLSTM(N_X, N_A, num_heads=2, num_layers=2, seed=1, dtype="float64")
    rng = np.random.default_rng(2)
    params = {"rnn": model.params,
              "head": {"Wy": 0.3 * rng.standard_normal((N_Y, N_A)), "by": np.zeros((N_Y, 1))}}

    def loss_fn(params, batch):
        x, labels = batch
        y, _, cache = model.forward(x, params=params["rnn"])
        flat = y.reshape(N_A, -1)
        z = params["head"]["Wy"] @ flat + params["head"]["by"]
        z = z - z.max(axis=0)
        p = np.exp(z)
        p /= p.sum(axis=0)
        lab = labels.reshape(-1)
        cols = np.arange(lab.size)
        loss = -np.log(p[lab, cols]).mean()
        dz = p.copy()
        dz[lab, cols] -= 1.0
        dz /= lab.size
        _, _, grads = model.backward((params["head"]["Wy"].T @ dz).reshape(y.shape), cache)
        return loss, {"rnn": grads, "head": {"Wy": dz @ flat.T,
                                             "by": dz.sum(axis=1, keepdims=True)}}

    return params, _data(1), loss_fn, _shard


CASES = {"notebook": notebook_case, "model": model_case}


def case(kind):
    return CASES[kind]()
