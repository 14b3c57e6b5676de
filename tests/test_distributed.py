"""Data-parallel training (``fit(..., comm=...)``) and batch inference on Dask.

* In one process, on a communicator of threads (``thread_comm``): two ranks equal one
  process on the same global batches; a failing rank, shards of different shapes, sources
  of different lengths, a callback's stop and parameters that drift apart are handled the
  same on every rank; a checkpoint resumes to the uninterrupted run.
* Under ``mpiexec -n 2`` (where mpi4py and an MPI are installed): the same equality, to
  1e-12 in float64 and identical on both ranks; a rank that raises, one that hangs and
  shards of different shapes stop every rank in bounded time; a resumed run.
* Dask: ``predict`` is lazy, one task per chunk, and equals the local forward pass bit for
  bit, on the threaded scheduler and on a ``dask.distributed`` cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from dp_case import case
from thread_comm import run_ranks

import xlstm
from xlstm import distributed
from xlstm._lib.tree import flatten

KINDS = pytest.mark.parametrize("kind", ["notebook", "model"])


def _fit_ranks(kind, size, *, tweak=None, **kw):
    """``fit`` on ``size`` thread ranks, each on its shards; the results by rank."""
    params, batches, loss_fn, shard_batch = case(kind)

    def rank(comm):
        mine = [shard_batch(b, comm) for b in batches]
        if tweak is not None:
            mine, comm = tweak(mine, comm)
        return xlstm.fit(params, mine, loss_fn, xlstm.Adam(lr=1e-2), comm=comm, **kw)

    return run_ranks(size, rank)


def _raise_any(results):
    for r in results:
        if isinstance(r, BaseException):
            raise r


@KINDS
def test_two_ranks_equal_one_process(kind):
    """Parameters and loss history of 2 (and 4) ranks against one process on the global
    batches: equal to 1e-12 (float64), and identical on every rank."""
    params, batches, loss_fn, _ = case(kind)
    one = xlstm.fit(params, batches, loss_fn, xlstm.Adam(lr=1e-2), epochs=2)
    for size in (2, 4):
        res = _fit_ranks(kind, size, epochs=2)
        _raise_any(res)
        want = flatten(one.params)
        for r in res:
            got = flatten(r.params)
            assert len(r.history) == len(one.history) == 8
            np.testing.assert_allclose(r.history, one.history, rtol=1e-12, atol=0)
            for k in want:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-14, err_msg=k)
                assert np.array_equal(got[k], flatten(res[0].params)[k]), k
        assert all(r.history == res[0].history for r in res)


def test_a_failing_rank_stops_every_rank():
    """Rank 1's loss raises at step 3: every rank raises RankError naming rank 1, the step
    and its error; rank 1's is chained to its own exception."""
    params, batches, loss_fn, shard_batch = case("notebook")

    def rank(comm):
        calls = []

        def loss(p, b):
            calls.append(1)
            if comm.rank == 1 and len(calls) == 3:
                raise KeyError("label 9 is not in the vocabulary")
            return loss_fn(p, b)

        mine = [shard_batch(b, comm) for b in batches]
        return xlstm.fit(params, mine, loss, xlstm.SGD(lr=0.1), comm=comm)

    res = run_ranks(4, rank)
    for r in res:
        assert isinstance(r, distributed.RankError), r
        assert "rank 1 failed at step 3: KeyError" in str(r)
        assert "label 9 is not in the vocabulary" in str(r)
    assert isinstance(res[1].__cause__, KeyError)


def test_shards_of_different_shapes_are_refused():
    def tweak(mine, comm):
        if comm.rank == 1:
            mine = [(x[:, :-1], y[:-1]) for x, y in mine]
        return mine, comm

    res = _fit_ranks("notebook", 2, tweak=tweak)
    for r in res:
        assert isinstance(r, ValueError), r
        assert "the ranks' batches differ in shape at step 1" in str(r)


def test_sources_of_different_lengths_are_refused():
    def tweak(mine, comm):
        return (mine[:2] if comm.rank == 0 else mine), comm

    res = _fit_ranks("notebook", 2, tweak=tweak)
    for r in res:
        assert isinstance(r, ValueError) and "ran out at different steps (step 3)" in str(r), r


def test_the_callback_runs_on_rank_0_and_stops_every_rank(capsys):
    seen = []

    def callback(info):
        seen.append(info.step)
        info.log(f"step {info.step}")
        return info.step == 2

    res = _fit_ranks("notebook", 2, callback=callback, epochs=3)
    _raise_any(res)
    assert seen == [1, 2]  # rank 0 alone
    assert all(r.stopped_early and len(r.history) == 2 for r in res)
    assert capsys.readouterr().out.count("step 2") == 1


def test_drifting_parameters_are_caught():
    """A communicator whose mean differs on one rank (say, a reduction that is not the
    same everywhere) leaves the parameters apart: fit says so on every rank."""

    class Skewed:
        def __init__(self, comm):
            self.comm, self.rank, self.size = comm, comm.rank, comm.size

        def allreduce_mean(self, tree):
            out = self.comm.allreduce_mean(tree)
            if self.rank == 1 and "dWf" in out:
                out = {**out, "dWf": out["dWf"] * (1 + 1e-9)}
            return out

        def broadcast(self, tree, root=0):
            return self.comm.broadcast(tree, root)

        def barrier(self):
            self.comm.barrier()

    res = _fit_ranks("notebook", 2, tweak=lambda mine, comm: (mine, Skewed(comm)))
    for r in res:
        assert isinstance(r, RuntimeError) and "the params differ between the ranks" in str(r)


@pytest.mark.parametrize("ranks", [None, 2], ids=["one-process", "two-ranks"])
def test_a_checkpoint_resumes_to_the_uninterrupted_run(tmp_path, ranks):
    """A run that fails after its checkpoint at step 4 (of 10, over 3 epochs of 4
    batches), resumed from the checkpoint, ends with the uninterrupted run's parameters
    and optimizer state, bit for bit, and its last losses."""
    params, batches, loss_fn, shard_batch = case("model")
    kw = {"epochs": 3, "steps": 10}
    ck = tmp_path / "ck.npz"

    def crash(info):
        if info.step == 6:
            raise OSError("the machine went down")

    def runs(comm):
        mine = batches if comm is None else [shard_batch(b, comm) for b in batches]
        whole = xlstm.fit(params, mine, loss_fn, xlstm.Adam(lr=1e-2), comm=comm, **kw)
        with pytest.raises((OSError, distributed.RankError), match="the machine went down"):
            xlstm.fit(params, mine, loss_fn, xlstm.Adam(lr=1e-2), comm=comm, checkpoint=ck,
                      checkpoint_every=4, callback=crash, **kw)
        again = xlstm.fit(params, mine, loss_fn, xlstm.Adam(lr=1e-2), comm=comm, resume=ck,
                          **kw)
        return whole, again

    res = [runs(None)] if ranks is None else run_ranks(ranks, runs)
    _raise_any(res)
    for whole, again in res:
        assert len(again.history) == 6 and again.history == whole.history[4:]
        for tree_a, tree_b in ((whole.params, again.params), (whole.opt_state["m"],
                                                              again.opt_state["m"])):
            a, b = flatten(tree_a), flatten(tree_b)
            assert all(np.array_equal(a[k], b[k]) for k in a)
        assert again.opt_state["step"] == whole.opt_state["step"] == 10
    _, counters = xlstm.io.load_checkpoint(ck)  # the failed run's: 4 batches of epoch 0
    assert counters == {"step": 4, "epoch": 0, "batch": 4, "opt_state.step": 4}


def test_a_finished_checkpoint_resumes_to_nothing(tmp_path):
    params, batches, loss_fn, _ = case("notebook")
    ck = tmp_path / "ck.npz"
    done = xlstm.fit(params, batches, loss_fn, xlstm.SGD(lr=0.1), checkpoint=ck, steps=3)
    again = xlstm.fit(params, batches, loss_fn, xlstm.SGD(lr=0.1), resume=ck, steps=3)
    assert again.history == [] and all(np.array_equal(again.params[k], done.params[k])
                                       for k in params)


def test_bad_arguments_are_named(tmp_path):
    params, batches, loss_fn, _ = case("notebook")
    with pytest.raises(TypeError, match="comm must be a communicator"):
        xlstm.fit(params, batches, loss_fn, xlstm.SGD(lr=0.1), comm=object())
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint="):
        xlstm.fit(params, batches, loss_fn, xlstm.SGD(lr=0.1), checkpoint_every=2)
    ck = tmp_path / "other.npz"
    xlstm.io.save_checkpoint(ck, {"params": {"W": np.ones((2, 2))}}, {"step": 1, "epoch": 0,
                                                                      "batch": 1})
    with pytest.raises(ValueError, match="the checkpoint's params must have the structure"):
        xlstm.fit(params, batches, loss_fn, xlstm.SGD(lr=0.1), resume=ck)
    plain = tmp_path / "plain.npz"
    xlstm.save_params(plain, params)
    with pytest.raises(ValueError, match="not a checkpoint"):
        xlstm.fit(params, batches, loss_fn, xlstm.SGD(lr=0.1), resume=plain)


def test_importing_distributed_imports_no_mpi_dask_or_cupy():
    code = ("import sys, xlstm, xlstm.distributed\n"
            "bad = [m for m in ('mpi4py', 'dask', 'distributed', 'cupy', 'cupyx') "
            "if m in sys.modules]\n"
            "assert not bad, bad\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]


def test_shard():
    class Two:
        rank, size = 1, 2

    x = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(distributed.shard(x, Two(), 1), x[:, 2:])
    with pytest.raises(ValueError, match="a batch of 3 along axis 0 does not split into 2"):
        distributed.shard(x, Two(), 0)


# -------------------------------------------------------------------------------- MPI
def _mpiexec():
    """The MPI launcher; skip without mpi4py or an MPI, unless ``XLSTM_REQUIRE_MPI`` is set
    (CI sets it: there a missing MPI is a failure, not a skip)."""
    exe = shutil.which("mpiexec") or shutil.which("mpirun")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        exe = None
    if exe is None:
        why = "needs mpi4py and an mpiexec on the PATH (pip install mpich '.[mpi]')"
        if os.environ.get("XLSTM_REQUIRE_MPI"):
            pytest.fail(why + "; XLSTM_REQUIRE_MPI is set")
        pytest.skip(why)
    return exe


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_worker.py")


def _mpi(tmp_path, *args, ranks=2, timeout=120, env=None):
    """``mpiexec -n ranks python -m mpi4py mpi_worker.py *args tmp_path``: the completed
    process and its wall time."""
    cmd = [_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", WORKER, args[0],
           str(tmp_path), *args[1:]]
    start = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})}, check=False)
    return run, time.monotonic() - start


def test_mpi_protocol_on_a_tree_of_mixed_arrays(tmp_path):
    """``allreduce_mean`` and ``broadcast`` keep each leaf's namespace, dtype and shape,
    and leave the input alone; a root that is not a rank is refused."""
    pytest.importorskip("torch")
    run, _ = _mpi(tmp_path, "protocol")
    assert run.returncode == 0, run.stderr[-3000:]
    for r in (0, 1):
        got = json.loads((tmp_path / f"protocol_{r}.json").read_text())
        assert got["a"] == [[1.5] * 3] * 2 and got["a_dtype"] == "float32"
        assert got["b"] == [0.0, 1.5, 3.0] and got["t"] == [1.5, 1.5]
        assert got["t_type"] == "Tensor" and got["root_a"] == [[2.0] * 3] * 2
        assert got["input_a"] == [[r + 1.0] * 3] * 2
        assert got["bad_root"] == "root must be a rank in [0, 2), got 2"


@KINDS
def test_mpi_two_ranks_equal_one_process(tmp_path, kind):
    run, _ = _mpi(tmp_path, "train", kind, "6")
    assert run.returncode == 0, run.stderr[-3000:]
    params, batches, loss_fn, _ = case(kind)
    one = xlstm.fit(params, batches, loss_fn, xlstm.Adam(lr=1e-2), epochs=3, steps=6)
    want = flatten(one.params)
    got = [flatten(xlstm.load_params(tmp_path / f"params_{r}.npz")) for r in (0, 1)]
    worst = max(float(np.max(np.abs(got[0][k] - want[k]))) for k in want)
    assert worst < 1e-12, worst
    assert all(np.array_equal(got[0][k], got[1][k]) for k in want)
    hist = [json.loads((tmp_path / f"history_{r}.json").read_text()) for r in (0, 1)]
    assert hist[0] == hist[1]
    np.testing.assert_allclose(hist[0], one.history, rtol=1e-12)


@pytest.mark.parametrize("mode, expect", [
    ("fail", "RankError: rank 1 failed at step 2: ValueError: rank 1 cannot read its batch"),
    ("shapes", "ValueError: the ranks' batches differ in shape at step 1"),
])
def test_mpi_an_error_on_one_rank_stops_every_rank(tmp_path, mode, expect):
    run, seconds = _mpi(tmp_path, mode)
    assert run.returncode != 0
    for r in (0, 1):
        assert (tmp_path / f"error_{r}.txt").read_text().startswith(expect), run.stderr[-3000:]
    assert seconds < 60


def test_mpi_a_hung_rank_times_out(tmp_path):
    """Rank 1 sleeps in its loss for 10 minutes; with a 3 s timeout rank 0 raises
    TimeoutError, and ``python -m mpi4py`` aborts both: the job ends in seconds."""
    run, seconds = _mpi(tmp_path, "hang", env={"XLSTM_TEST_TIMEOUT": "3"})
    assert run.returncode != 0
    text = (tmp_path / "error_0.txt").read_text()
    assert text.startswith("TimeoutError: rank 0: allreduce_mean got no answer"), text
    assert seconds < 60, seconds


def test_mpi_checkpoint_resumes(tmp_path):
    run, _ = _mpi(tmp_path, "resume", "model")
    assert run.returncode == 0, run.stderr[-3000:]
    for r in (0, 1):
        got = json.loads((tmp_path / f"resume_{r}.json").read_text())
        assert got == {"stopped": "rank 0 failed at step 5: RuntimeError: the machine went "
                                  "down", "steps": 4, "diff": 0.0, "history": True}


# ------------------------------------------------------------------------------- Dask
def _predict_case(layout="notebook"):
    model = xlstm.LSTM(3, 5, num_layers=2, bidirectional=True, seed=1, layout=layout, dtype="float64")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 10, 7))
    state = tuple(0.1 * rng.standard_normal((4, 5, 10)) for _ in range(2))
    lengths = np.array([7, 3, 5, 1, 7, 2, 6, 4, 7, 7])
    return model, x, state, lengths


def _local(model, x, state, lengths, rows):
    """The local forward pass over the same blocks of rows as the Dask tasks."""
    outs = []
    for lo, hi in rows:
        st = tuple(s[..., lo:hi] for s in state)
        outs.append(model.forward(x[:, lo:hi], st, lengths=lengths[lo:hi],
                                  return_cache=False)[0])
    return np.concatenate(outs, axis=1)


def test_predict_is_lazy_one_task_per_chunk_and_equals_the_local_forward():
    da = pytest.importorskip("dask.array")
    model, x, state, lengths = _predict_case()
    dx = da.from_array(x, chunks=(2, 3, 4))  # chunked along every axis: merged but m
    y = distributed.predict(model, dx, state=state, lengths=lengths)
    assert isinstance(y, da.Array) and y.shape == (10, 10, 7) and y.chunks[1] == (3, 3, 3, 1)
    runs = [k for k in dict(y.__dask_graph__()) if isinstance(k, tuple) and "run" in k[0]]
    assert len(runs) == 4  # one task per chunk of the batch
    got = y.compute(scheduler="threads")
    rows = [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert np.array_equal(got, _local(model, x, state, lengths, rows))
    whole = model.forward(x, state, lengths=lengths, return_cache=False)[0]
    # a whole batch runs other GEMM shapes, which round differently
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-15)


def test_predict_batch_first_and_mlstm():
    da = pytest.importorskip("dask.array")
    model = xlstm.MLSTM(3, 4, num_heads=2, layout="batch_first", seed=2, dtype="float64")
    x = np.random.default_rng(1).standard_normal((10, 7, 3))
    y = distributed.predict(model, da.from_array(x, chunks=(4, 7, 3))).compute()
    local = np.concatenate([model.forward(x[lo:lo + 4], return_cache=False)[0]
                            for lo in (0, 4, 8)])
    assert np.array_equal(y, local)
    with pytest.raises(TypeError, match="x must be a dask array"):
        distributed.predict(model, x)


def test_predict_on_a_dask_distributed_cluster():
    pytest.importorskip("dask.array")
    dd = pytest.importorskip("distributed")
    import dask.array as da

    model, x, state, lengths = _predict_case()
    with dd.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         dashboard_address=None) as cluster, dd.Client(cluster) as client:
        y = distributed.predict(model, da.from_array(x, chunks=(3, 5, 7)), state=state,
                                lengths=lengths)
        got = client.compute(y).result()
    assert np.array_equal(got, _local(model, x, state, lengths, [(0, 5), (5, 10)]))


@pytest.mark.gpu
def test_nccl_comm_on_one_gpu():
    """The NCCL communicator on a world of one process: the mean and the broadcast of a
    tree are the tree itself, on the device."""
    cp = pytest.importorskip("cupy")
    pytest.importorskip("cupyx.distributed")
    try:
        cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no CUDA at all
        pytest.skip(f"no CUDA device: {exc}")
    comm = distributed.NCCLComm(1, 0, port=13579)
    tree = {"a": cp.arange(6.0).reshape(2, 3), "b": [cp.ones(3, dtype=cp.float32)]}
    for out in (comm.allreduce_mean(tree), comm.broadcast(tree)):
        assert isinstance(out["a"], cp.ndarray) and out["b"][0].dtype == cp.float32
        assert cp.array_equal(out["a"], tree["a"]) and cp.array_equal(out["b"][0], tree["b"][0])
    comm.barrier()


# ------------------------------------------------------------- errors that say the fix
def test_shard_refuses_what_it_cannot_split():
    class Comm:
        def __init__(self, rank, size):
            self.rank, self.size = rank, size

    x = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(distributed.shard(x, Comm(1, 2), -1), x[:, 2:])
    np.testing.assert_array_equal(distributed.shard(x, Comm(0, 1), np.int64(0)), x)
    cases = [
        ((x, Comm(2, 2), 1), ValueError, r"comm.rank must be in \[0, comm.size\) = \[0, 2\), "
                                         "got 2"),
        ((x, Comm(-1, 2), 1), ValueError, "comm.rank must be in"),
        ((x, Comm(0, 0), 1), ValueError, "comm.size must be at least 1, got 0"),
        ((x, Comm(0.5, 2), 1), TypeError, "comm.rank and comm.size must be integers"),
        ((x, object(), 1), TypeError, "comm must be a communicator with rank and size"),
        ((x, Comm(0, 2), 2), ValueError, r"axis 2 is out of range for x of shape \(3, 4\)"),
        ((x, Comm(0, 2), -3), ValueError, "axis -3 is out of range"),
        ((x, Comm(0, 2), 1.0), TypeError, "axis must be an integer, got float"),
        (([[1.0, 2.0]], Comm(0, 2), 1), TypeError, "x must be an array .* got list"),
    ]
    for args, kind, match in cases:
        with pytest.raises(kind, match=match):
            distributed.shard(*args)


def test_predict_refuses_lengths_state_or_model_that_do_not_fit():
    da = pytest.importorskip("dask.array")
    model, x, state, lengths = _predict_case()
    dx = da.from_array(x, chunks=(3, 3, 7))
    with pytest.raises(ValueError, match=r"lengths must have shape \(10,\).* got \(9,\)"):
        distributed.predict(model, dx, lengths=lengths[:9])
    with pytest.raises(ValueError, match=r"state must hold .* \(batch last, m = 10 from x\)"):
        distributed.predict(model, dx, state=tuple(s[..., :9] for s in state))
    with pytest.raises(ValueError, match="state must hold"):
        distributed.predict(model, dx, state=state[:1])
    with pytest.raises(TypeError, match="state must be a tuple"):
        distributed.predict(model, dx, state=state[0])
    with pytest.raises(TypeError, match="model must be an xlstm model .* got function"):
        distributed.predict(lambda v: v, dx)


def test_ranks_whose_parameters_differ_in_dtype_are_told_at_the_start():
    """Rank 1's parameters are float32, rank 0's float64: every rank raises before the
    first step (it was found only at the end of the run)."""
    params, batches, loss_fn, shard_batch = case("notebook")
    steps = []

    def rank(comm):
        mine = [shard_batch(b, comm) for b in batches]
        p = params if comm.rank == 0 else {k: v.astype(np.float32) for k, v in params.items()}

        def counted(pp, b):
            steps.append(1)
            return loss_fn(pp, b)

        return xlstm.fit(p, mine, counted, xlstm.SGD(lr=0.1), comm=comm)

    res = run_ranks(2, rank)
    for r in res:
        assert isinstance(r, ValueError), r
        assert "differ in structure, shape or dtype" in str(r)
    assert "float32" in str(res[1]) and "float64" in str(res[0])
    assert not steps
