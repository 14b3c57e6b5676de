"""Run by the tests under ``mpiexec -n N python -m mpi4py tests/mpi_worker.py MODE OUT``:
data-parallel training on MPI, whose results every rank writes under ``OUT``.

Modes:

* ``train KIND STEPS``: ``fit`` on this rank's shards for STEPS steps; writes
  ``params_<rank>.npz`` and ``history_<rank>.json``.
* ``fail``, ``hang``, ``shapes``: rank 1 raises in its ``loss_fn`` at step 2, sleeps there,
  or takes a shard of another size; every rank writes the error it got to
  ``error_<rank>.txt`` and ends with it (``python -m mpi4py`` then aborts every rank).
* ``protocol``: ``allreduce_mean``, ``broadcast`` and ``barrier`` on a tree of numpy
  float32 and float64 arrays, and on a torch tensor; writes ``protocol_<rank>.json``.
* ``resume``: an uninterrupted run, a run stopped by a failure after its checkpoint at
  step 4, and a run resumed from that checkpoint; writes ``resume_<rank>.json`` with the
  largest difference between the first and the last.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dp_case import case  # noqa: E402

import xlstm  # noqa: E402
from xlstm import distributed  # noqa: E402
from xlstm._lib.tree import flatten  # noqa: E402


def main(mode, out, *args):
    comm = distributed.MPIComm(timeout=float(os.environ.get("XLSTM_TEST_TIMEOUT", "60")))
    rank = comm.rank
    kind = args[0] if args else "notebook"
    params, batches, loss_fn, shard_batch = case(kind)
    mine = [shard_batch(b, comm) for b in batches]

    if mode == "train":
        res = xlstm.fit(params, mine, loss_fn, xlstm.Adam(lr=1e-2), epochs=3,
                        steps=int(args[1]), comm=comm)
        xlstm.save_params(os.path.join(out, f"params_{rank}.npz"), res.params)
        with open(os.path.join(out, f"history_{rank}.json"), "w") as f:
            json.dump(res.history, f)
        return

    if mode == "protocol":  # the communicator alone, on a tree of mixed dtypes
        import torch

        r = float(rank + 1)
        tree = {"a": np.full((2, 3), r, np.float32), "b": [np.arange(3.0) * r]}
        mean = comm.allreduce_mean(tree)
        mean["t"] = comm.allreduce_mean({"t": torch.full((2,), r, dtype=torch.float64)})["t"]
        root = comm.broadcast(tree, root=1)
        comm.barrier()
        got = {"a": mean["a"].tolist(), "a_dtype": str(mean["a"].dtype),
               "b": mean["b"][0].tolist(), "t": mean["t"].tolist(),
               "t_type": type(mean["t"]).__name__, "root_a": root["a"].tolist(),
               "input_a": tree["a"].tolist()}
        try:
            comm.broadcast(tree, root=2)
        except ValueError as exc:
            got["bad_root"] = str(exc)
        with open(os.path.join(out, f"protocol_{rank}.json"), "w") as f:
            json.dump(got, f)
        return

    if mode == "resume":
        kw = {"epochs": 3, "steps": 8}
        whole = xlstm.fit(params, mine, loss_fn, xlstm.Adam(lr=1e-2), comm=comm, **kw)
        ck = os.path.join(out, "ck.npz")

        def crash(info):
            if info.step == 5:
                raise RuntimeError("the machine went down")

        try:
            xlstm.fit(params, mine, loss_fn, xlstm.Adam(lr=1e-2), comm=comm, checkpoint=ck,
                      checkpoint_every=2, callback=crash, **kw)
        except distributed.RankError as exc:
            stopped = str(exc)
        again = xlstm.fit(params, mine, loss_fn, xlstm.Adam(lr=1e-2), comm=comm, resume=ck,
                          **kw)
        a, b = flatten(whole.params), flatten(again.params)
        with open(os.path.join(out, f"resume_{rank}.json"), "w") as f:
            json.dump({"stopped": stopped, "steps": len(again.history),
                       "diff": max(float(np.max(np.abs(a[k] - b[k]))) for k in a),
                       "history": again.history == whole.history[-len(again.history):]}, f)
        return

    def bad_loss(params, batch):
        if rank == 1 and bad_loss.calls == 1:
            if mode == "fail":
                raise ValueError("rank 1 cannot read its batch")
            if mode == "hang":
                time.sleep(600)
        bad_loss.calls += 1
        return loss_fn(params, batch)

    bad_loss.calls = 0
    if mode == "shapes" and rank == 1:
        mine = [(x[:, :-1], y[:-1]) for x, y in mine]
    try:
        xlstm.fit(params, mine, bad_loss if mode != "shapes" else loss_fn,
                  xlstm.Adam(lr=1e-2), steps=4, comm=comm)
    except Exception as exc:
        with open(os.path.join(out, f"error_{rank}.txt"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")
        raise
    raise SystemExit(f"mode {mode}: no error on rank {rank}")


if __name__ == "__main__":
    main(*sys.argv[1:])
