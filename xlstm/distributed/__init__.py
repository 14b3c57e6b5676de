"""Scale out: data-parallel training on MPI or NCCL, and batch inference on Dask.

Data-parallel training is SPMD: every rank runs the same script and the same
:func:`xlstm.fit` on its shard of each global batch, with a communicator::

    from xlstm import distributed

    comm = distributed.MPIComm()              # mpi4py's COMM_WORLD
    x_mine = distributed.shard(x, comm, axis=1)   # this rank's rows of a global batch
    result = xlstm.fit(params, batches, loss_fn, Adam(), comm=comm)

``fit`` broadcasts the starting parameters from rank 0 and averages the gradients over the
ranks before every optimizer step, so the parameters stay identical on every rank; with a
mean loss and equal shards the run equals one process training on the global batches, to
rounding. Launch it with ``mpiexec -n 4 python -m mpi4py train.py`` (``python -m mpi4py``
aborts every rank when one ends with an uncaught exception).

A communicator is anything with the attributes and methods of :class:`Comm`. Two are
here: :class:`MPIComm` (mpi4py: numpy arrays, and CuPy arrays through a CUDA-aware MPI or
the host) and :class:`NCCLComm` (``cupyx.distributed``: CuPy arrays on many GPUs). Neither
mpi4py, CuPy nor Dask is imported until one of them is used.

:func:`predict` runs a model's forward pass over a Dask array chunked along the batch, one
task per chunk, lazily.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._lib.compat import namespace, to_host
from .._lib.tree import flatten, unflatten

__all__ = ["Comm", "MPIComm", "NCCLComm", "RankError", "shard", "predict"]


class RankError(RuntimeError):
    """A rank failed during a collective step: raised on every rank, with the failing
    rank's error in the message (and, on that rank, chained to the original)."""


@runtime_checkable
class Comm(Protocol):
    """The communicator protocol that :func:`xlstm.fit` uses.

    Attributes
    ----------
    rank : int
        This process's index, ``0 <= rank < size``.
    size : int
        The number of processes.
    """

    rank: int
    size: int

    def allreduce_mean(self, tree: Any) -> Any:
        """The mean over the ranks of a tree (dict, list, tuple) of arrays: the same
        structure, namespace, dtypes and device, identical on every rank."""

    def broadcast(self, tree: Any, root: int = 0) -> Any:
        """Rank ``root``'s tree of arrays on every rank (the others pass a tree of the same
        structure, shapes and dtypes, whose values are ignored)."""

    def barrier(self) -> None:
        """Return when every rank has called it."""


class _BufferComm:
    """The tree handling shared by the adapters: the leaves of a tree are packed into one
    contiguous buffer per dtype, so that a tree costs one collective per dtype whatever
    its number of arrays. A subclass provides ``_sum(buf)`` and ``_bcast(buf, root)``,
    in place on a 1-D buffer, and ``_buffer(host_or_device_array)``/``_back``."""

    rank: int
    size: int
    timeout: float

    def _pack(self, tree, name):
        """The leaves of ``tree`` by path, their namespace, and one 1-D buffer per dtype
        (in the adapter's buffer space) with each leaf's (dtype, offset, shape)."""
        leaves = flatten(tree, name)
        for path, leaf in leaves.items():
            if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
                raise TypeError(f"{name}{path} must be an array, got {type(leaf).__name__}")
        groups: dict[Any, dict] = {}  # dtype -> the leaves of that dtype, by name
        sizes: dict[Any, int] = {}
        where = {}
        for path, leaf in leaves.items():
            offset = sizes.get(leaf.dtype, 0)
            where[path] = (leaf.dtype, offset, tuple(leaf.shape))
            sizes[leaf.dtype] = offset + math.prod(leaf.shape)
            groups.setdefault(leaf.dtype, {})[f"{name}{path}"] = leaf
        # one namespace (and device) for the whole tree, one dtype per buffer
        spaces = [namespace(**parts) for parts in groups.values()]
        if any(xp is not spaces[0] for xp in spaces):
            raise TypeError(f"{name} mixes array namespaces: one tree, one namespace")
        xp = spaces[0]
        buffers = {dt: self._buffer(list(parts.values()), xp) for dt, parts in groups.items()}
        return leaves, xp, buffers, where

    def _unpack(self, tree, leaves, xp, buffers, where, divisor=1):
        """The tree again, each leaf its part of its buffer divided by ``divisor`` (in the
        one pass that gives the leaf its own memory)."""
        out = {}
        for path, leaf in leaves.items():
            dt, offset, shape = where[path]
            flat = buffers[dt][offset : offset + math.prod(shape)] / divisor
            out[path] = self._back(flat, shape, leaf, xp)
        return unflatten(tree, out)

    def allreduce_mean(self, tree: Any) -> Any:
        """The mean over the ranks of a tree of arrays (see :class:`Comm`)."""
        leaves, xp, buffers, where = self._pack(tree, "tree")
        for buf in buffers.values():
            self._sum(buf)
        return self._unpack(tree, leaves, xp, buffers, where, divisor=self.size)

    def broadcast(self, tree: Any, root: int = 0) -> Any:
        """Rank ``root``'s tree on every rank (see :class:`Comm`)."""
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < self.size:
            raise ValueError(f"root must be a rank in [0, {self.size}), got {root!r}")
        leaves, xp, buffers, where = self._pack(tree, "tree")
        for buf in buffers.values():
            self._bcast(buf, root)
        return self._unpack(tree, leaves, xp, buffers, where)

    def _deadline(self, done, what):
        """Poll ``done()`` until it is true, or raise TimeoutError after ``timeout`` s."""
        start = time.monotonic()
        spins = 0
        while not done():
            spins += 1
            if spins > 1000:
                if time.monotonic() - start > self.timeout:
                    raise TimeoutError(
                        f"rank {self.rank}: {what} got no answer from every rank within "
                        f"{self.timeout:g} s: a rank has failed, hung or left"
                    )
                time.sleep(1e-4)

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


def _host_buffer(parts):
    """One float buffer on the host holding ``parts`` one after the other."""
    return np.concatenate([np.reshape(to_host(p), (-1,)) for p in parts])


def _host_back(flat, shape, like, xp):
    """``flat`` (numpy, its own memory) as an array of ``like``'s namespace, dtype, shape
    and device."""
    from .._lib.compat import device_of, device_scope

    dev = device_of(like)
    with device_scope(xp=xp, device=dev):
        return xp.asarray(np.reshape(flat, shape), dtype=like.dtype, device=dev)


class MPIComm(_BufferComm):
    """The communicator protocol on mpi4py.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        The MPI communicator (default ``MPI.COMM_WORLD``).
    timeout : float, optional
        Seconds a collective waits for every rank before it raises ``TimeoutError``
        (default 300): a rank that hangs or died does not hang the others for ever.
    cuda_aware : bool, optional
        Hand CuPy arrays to MPI as device buffers, which needs an MPI built with CUDA
        support. Default False: CuPy arrays go through the host.

    Notes
    -----
    The collectives are non-blocking MPI calls polled until done, which is what bounds
    them in time. The arrays of any namespace work: numpy (and CuPy with ``cuda_aware``)
    directly, the others through a host copy.
    """

    def __init__(self, comm: Any = None, *, timeout: float = 300.0,
                 cuda_aware: bool = False) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = _positive_seconds(timeout)
        self.cuda_aware = bool(cuda_aware)

    def _device_buffers(self, xp):
        from .._lib.compat import is_cupy

        return self.cuda_aware and is_cupy(xp)

    def _buffer(self, parts, xp):
        if self._device_buffers(xp):
            return xp.concat([xp.reshape(p, (-1,)) for p in parts])
        return _host_buffer(parts)

    def _back(self, flat, shape, like, xp):
        if self._device_buffers(xp):
            return xp.reshape(flat, shape)
        return _host_back(flat, shape, like, xp)

    def _sync(self, buf):
        if not isinstance(buf, np.ndarray):  # a CuPy buffer: its writes done before MPI
            import cupy

            cupy.cuda.get_current_stream().synchronize()

    def _sum(self, buf):
        self._sync(buf)
        req = self.comm.Iallreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        self._deadline(req.Test, "allreduce_mean")

    def _bcast(self, buf, root):
        self._sync(buf)
        req = self.comm.Ibcast(buf, root=root)
        self._deadline(req.Test, "broadcast")

    def barrier(self) -> None:
        """Return when every rank has called it (or raise ``TimeoutError``)."""
        req = self.comm.Ibarrier()
        self._deadline(req.Test, "barrier")

    def abort(self, code: int = 1) -> None:
        """Stop every rank now (``MPI_Abort``)."""
        self.comm.Abort(code)


class NCCLComm(_BufferComm):
    """The communicator protocol on ``cupyx.distributed`` (NCCL), for CuPy arrays on many
    GPUs: one process per GPU.

    Parameters
    ----------
    n_devices : int
        The number of processes (GPUs).
    rank : int
        This process's rank; it uses the current CuPy device.
    host, port : optional
        Where rank 0 listens for the others (``cupyx.distributed.init_process_group``'s
        defaults when ``None``).
    timeout : float, optional
        Seconds a collective waits for its stream before it raises ``TimeoutError``.
    backend : object, optional
        An initialised process group to use instead of making one.

    Notes
    -----
    Arrays of other namespaces go through the device (copied to CuPy and back).
    """

    def __init__(self, n_devices: int, rank: int, *, host: str | None = None,
                 port: int | None = None, timeout: float = 300.0, backend: Any = None) -> None:
        from .._lib.checks import positive_int

        self.size = positive_int("n_devices", n_devices)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size}), got {rank!r}")
        self.rank = rank
        self.timeout = _positive_seconds(timeout)
        if backend is None:
            from cupyx import distributed as cd

            kw = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
            backend = cd.init_process_group(n_devices, rank, backend="nccl", **kw)
        self.backend = backend

    def _buffer(self, parts, xp):
        import cupy

        return cupy.concatenate([cupy.reshape(cupy.asarray(p), (-1,)) for p in parts])

    def _back(self, flat, shape, like, xp):
        from .._lib.compat import is_cupy

        if is_cupy(xp):
            return xp.reshape(flat, shape)
        return _host_back(flat.get(), shape, like, xp)

    def _wait(self, what):
        import cupy

        stream = cupy.cuda.get_current_stream()
        self._deadline(lambda: stream.done, what)

    def _sum(self, buf):
        self.backend.all_reduce(buf, buf, op="sum")
        self._wait("allreduce_mean")

    def _bcast(self, buf, root):
        self.backend.broadcast(buf, root=root)
        self._wait("broadcast")

    def barrier(self) -> None:
        """Return when every rank has called it."""
        self.backend.barrier()


def _positive_seconds(timeout):
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not timeout > 0 or not math.isfinite(timeout):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


# ------------------------------------------------------------------ helpers for fit
def shard(x: Any, comm: Comm, axis: int) -> Any:
    """This rank's equal share of a global batch along ``axis``: the ``rank``-th of
    ``size`` consecutive blocks.

    Parameters
    ----------
    x : array
        The global batch, an array of any supported namespace (not a list).
    comm : communicator
        Its ``rank`` and ``size`` say which block: ``size >= 1``, ``0 <= rank < size``.
    axis : int
        The batch axis (``1`` for the notebook layout ``(n_x, m, T)``, ``0`` for
        ``batch_first``); negative counts from the end.

    Returns
    -------
    array
        A view of ``x``: its ``rank``-th block of ``x.shape[axis] // size`` along ``axis``.

    Raises
    ------
    TypeError
        If ``x`` is not an array, ``axis`` not an integer, or ``comm.rank``/``comm.size``
        not integers.
    ValueError
        If ``axis`` is out of range, ``comm.size < 1`` or ``comm.rank`` outside ``[0,
        size)``, or the axis does not divide evenly (every rank must hold a shard of the
        same shape for the averaged gradient to be the global batch's).
    """
    if isinstance(x, (list, tuple)) or not (hasattr(x, "shape") and hasattr(x, "ndim")):
        raise TypeError(f"x must be an array (the global batch), got {type(x).__name__}; "
                        "convert it first (numpy.asarray, say)")
    rank, size = _rank_and_size(comm)
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}") from None
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x of shape {tuple(x.shape)}; the "
                         "batch axis is 1 for the notebook layout (n_x, m, T), 0 for "
                         "batch_first")
    axis %= x.ndim
    n = x.shape[axis]
    if n % size:
        raise ValueError(f"a batch of {n} along axis {axis} does not split into {size} "
                         "equal shards; use a global batch size divisible by the ranks")
    k = n // size
    index = [slice(None)] * x.ndim
    index[axis] = slice(rank * k, (rank + 1) * k)
    return x[tuple(index)]


def _rank_and_size(comm) -> tuple[int, int]:
    """``(comm.rank, comm.size)`` checked: integers with ``0 <= rank < size``."""
    try:
        rank, size = operator.index(comm.rank), operator.index(comm.size)
    except AttributeError:
        raise TypeError(f"comm must be a communicator with rank and size (xlstm.distributed."
                        f"MPIComm, say), got {type(comm).__name__}") from None
    except TypeError:
        raise TypeError(f"comm.rank and comm.size must be integers, got {comm.rank!r} and "
                        f"{comm.size!r}") from None
    if size < 1:
        raise ValueError(f"comm.size must be at least 1, got {size}")
    if not 0 <= rank < size:
        raise ValueError(f"comm.rank must be in [0, comm.size) = [0, {size}), got {rank}; "
                         "a communicator's rank numbers its processes from 0")
    return rank, size


def _signature(obj) -> int:
    """A small integer (below 2**20) that names the shapes and dtypes of every array in
    ``obj`` (a batch: arrays, tuples, lists, dicts): ranks whose batches differ in shape
    get different numbers (but for a one-in-a-million collision)."""
    import zlib

    parts = []

    def walk(node):
        if isinstance(node, Mapping):
            for k in sorted(node, key=repr):
                parts.append(repr(k))
                walk(node[k])
        elif isinstance(node, (list, tuple)):
            parts.append(f"{type(node).__name__}{len(node)}")
            for v in node:
                walk(v)
        elif hasattr(node, "shape") and hasattr(node, "dtype"):
            parts.append(f"{tuple(node.shape)}{node.dtype}")
        else:
            parts.append(type(node).__name__)

    walk(obj)
    return zlib.crc32("|".join(parts).encode()) % 1_000_003


def _describe_kinds(obj) -> str:
    """The shapes and dtypes of the arrays of ``obj``, for messages."""
    return ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in flatten(obj).items())


def _describe_shapes(obj) -> str:
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe_shapes(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "(" + ", ".join(_describe_shapes(v) for v in obj) + ")"
    if hasattr(obj, "shape"):
        return f"{tuple(obj.shape)}"
    return type(obj).__name__


class Agreement:
    """One small float64 all-reduce per step that every rank enters, however its step
    went: whether any rank failed (and which), whether the batch sources ran out together,
    whether the batches have equal shapes, and the mean loss. Every rank reads the same
    reduced numbers, so every rank takes the same decision: all go on, or all raise."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm

    def step(self, step, *, failed, exhausted, batch, loss) -> float | None:
        """Enter the step's agreement; return the mean loss, or ``None`` when every
        rank's batches ran out; raise on every rank when any rank failed, only some ran
        out, or the batches differ in shape."""
        comm = self.comm
        sig = 0 if batch is None else _signature(batch)
        head = np.zeros(4 + comm.size)
        head[:4] = (bool(exhausted), sig, float(sig) ** 2, 0.0 if loss is None else loss)
        head[4 + comm.rank] = failed is not None
        mean = comm.allreduce_mean({"head": head})["head"]
        self._raise_failures(mean[4:], step, failed)
        if mean[0] > 0:
            if mean[0] * comm.size < comm.size - 0.5:
                raise ValueError(
                    f"the ranks' batch sources ran out at different steps (step {step}): "
                    "every rank must yield its shard of every global batch")
            return None
        if mean[2] - mean[1] ** 2 != 0.0:
            raise ValueError(
                f"the ranks' batches differ in shape at step {step} (this rank, {comm.rank}, "
                f"has {_describe_shapes(batch)}): every rank must take an equal shard of "
                "each global batch")
        return float(mean[3])

    def decide(self, step, *, failed, stop) -> bool:
        """Rank 0's verdict after its reporting (callback, checkpoint): ``stop`` on every
        rank, or the error of rank 0 raised on every rank."""
        comm = self.comm
        flags = np.array([failed is not None, bool(stop)], dtype=np.float64)
        flags = comm.broadcast({"f": flags}, root=0)["f"]
        if flags[0]:
            self._raise(0, step, failed)
        return bool(flags[1])

    def _raise_failures(self, by_rank, step, failed):
        bad = [r for r, f in enumerate(by_rank) if f > 0]
        if bad:
            self._raise(bad[0], step, failed)

    def _raise(self, root, step, failed):
        """Every rank raises RankError with rank ``root``'s message; ``root`` chains its
        own exception."""
        comm = self.comm
        text = np.zeros(2048)  # the message's UTF-8 bytes, as floats like every buffer
        if comm.rank == root:
            raw = f"{type(failed).__name__}: {failed}".encode("utf-8", "replace")[:2048]
            text[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        text = comm.broadcast({"t": text}, root=root)["t"]
        message = bytes(text.astype(np.uint8)).rstrip(b"\0").decode("utf-8", "replace")
        error = RankError(f"rank {root} failed at step {step}: {message}")
        if comm.rank == root:
            raise error from failed
        raise error

    def check_same_kind(self, tree, name="params") -> None:
        """Raise ``ValueError`` on every rank unless ``tree`` has the same structure,
        shapes and dtypes on every rank (before rank 0's values are broadcast into it)."""
        sig = _signature(tree)
        mean = self.comm.allreduce_mean({"k": np.array([sig, float(sig) ** 2])})["k"]
        if mean[1] - mean[0] ** 2 != 0.0:
            kinds = _describe_kinds(tree)
            raise ValueError(
                f"the ranks' {name} differ in structure, shape or dtype (this rank, "
                f"{self.comm.rank}, has {kinds[:400]}): every rank must start from "
                "parameters made alike (the same model, dtype and initialisation)")

    def check_identical(self, tree, name="params") -> None:
        """Raise RuntimeError on every rank unless ``tree`` is identical, bit for bit, on
        every rank (a digest of its bytes compared)."""
        import hashlib

        h = hashlib.sha256()
        for path, leaf in flatten(tree, name).items():
            h.update(path.encode())
            h.update(np.ascontiguousarray(to_host(leaf)).tobytes())
        words = [int.from_bytes(h.digest()[i : i + 3], "little") % 1_000_003 for i in (0, 3, 6)]
        head = np.array([*words, *(float(w) ** 2 for w in words)])
        mean = self.comm.allreduce_mean({"d": head})["d"]
        if any(mean[3 + i] - mean[i] ** 2 != 0.0 for i in range(3)):
            raise RuntimeError(f"the {name} differ between the ranks: data-parallel training "
                               "must keep them identical (same optimizer, same reduction)")


# ------------------------------------------------------------------ batch inference
def predict(model: Any, x: Any, *, state: tuple | None = None, lengths: Any = None) -> Any:
    """A model's forward pass over a Dask array chunked along the batch: lazy, one task
    per chunk, on any Dask scheduler (``dask.distributed`` too).

    Parameters
    ----------
    model : xlstm model
        :class:`xlstm.LSTM`, :class:`xlstm.GRU`, :class:`xlstm.RNN`, :class:`xlstm.SLSTM`
        or :class:`xlstm.MLSTM`; its parameters go into the graph once.
    x : dask.array.Array
        Inputs ``(n_x, m, T)`` (``(m, T, n_x)`` with ``layout="batch_first"``), whose chunks
        hold numpy or CuPy arrays of the model's namespace and dtype. Chunks along an axis
        other than the batch are merged (each task needs whole sequences).
    state : tuple of arrays, optional
        The initial state (host or Dask arrays of the model's state shapes, batch last);
        default zeros.
    lengths : array of shape (m,), optional
        Each sequence's length (numpy, CuPy or Dask).

    Returns
    -------
    dask.array.Array
        ``y``, chunked like ``x`` along the batch; ``.compute()`` runs it.

    Raises
    ------
    TypeError
        If ``model`` is not an xlstm model or ``x`` not a Dask array.
    ValueError
        If ``x`` is not 3-D, or ``lengths`` or ``state`` do not match its batch (their
        shapes are checked here, before anything is computed).
    """
    import dask
    import dask.array as da

    if not all(callable(getattr(model, k, None)) for k in ("forward", "_state_shapes")) \
            or not all(hasattr(model, k) for k in ("D", "n_a")):
        raise TypeError("model must be an xlstm model (xlstm.LSTM, GRU, RNN, SLSTM, MLSTM), "
                        f"got {type(model).__name__}")
    if not isinstance(x, da.Array):
        raise TypeError(f"x must be a dask array, got {type(x).__name__}; wrap it with "
                        "dask.array.from_array(x, chunks=...) chunked along the batch")
    first = getattr(model, "layout", "notebook") == "batch_first"
    b_axis = 0 if first else 1
    if x.ndim != 3:
        raise ValueError(f"x must be 3-D, got shape {x.shape}")
    m = x.shape[b_axis]
    x = x.rechunk({a: -1 for a in range(3) if a != b_axis})
    chunks = x.chunks[b_axis]
    args = [x, ("b", "t", "n") if first else ("n", "b", "t")]
    n_state = 0
    if state is not None:
        if not isinstance(state, (tuple, list)):
            raise TypeError(f"state must be a tuple of arrays (the model's state, batch "
                            f"last), got {type(state).__name__}")
        want = [tuple(w) for w in model._state_shapes(m)]  # the model's, batch last
        got = [tuple(getattr(s, "shape", ())) for s in state]
        if got != want:
            raise ValueError(f"state must hold {len(want)} arrays of shapes {want} (batch "
                             f"last, m = {m} from x), got {got}")
        for i, s in enumerate(state):  # (..., m): batch last
            s = _batch_chunks(da, s, chunks, axis=-1)
            args += [s, (*(f"s{i}_{j}" for j in range(s.ndim - 1)), "b")]
            n_state += 1
    if lengths is not None:
        if tuple(getattr(lengths, "shape", ())) != (m,):
            raise ValueError(f"lengths must have shape ({m},), one length per sequence of x "
                             f"(m = {m}), got {tuple(getattr(lengths, 'shape', ()))}")
        args += [_batch_chunks(da, lengths, chunks, axis=0), ("b",)]
    out_rows = model.D * model.n_h

    def run(block, *rest, model):
        st = tuple(rest[:n_state]) if n_state else None
        ln = rest[n_state] if len(rest) > n_state else None
        y, _, _ = model.forward(block, st, lengths=ln, return_cache=False)
        return y

    out = ("b", "t", "o") if first else ("o", "b", "t")
    return da.blockwise(run, out, *args, model=dask.delayed(model, pure=True), dtype=x.dtype,
                        concatenate=True, new_axes={"o": out_rows}, meta=x._meta)


def _batch_chunks(da, a, chunks, axis=-1):
    """``a`` as a Dask array chunked like the batch (``chunks``) along ``axis``, whole
    along the others."""
    arr = a if isinstance(a, da.Array) else da.from_array(a, chunks=-1)
    axis = axis % arr.ndim
    return arr.rechunk({i: (chunks if i == axis else -1) for i in range(arr.ndim)})
