"""The time loop, for every cell: chunked input GEMM, recurrent GEMM, the cell's step.

Internal layout is time-major with the batch in rows: a step's input is ``(m, n_x)``, a
state ``(m, n_a)``, and a sequence of them ``(T, m, n_a)``. A cell (:mod:`xlstm.cells`)
declares its states, its saved stacks and its fused weights, and supplies its step; this
module knows no cell and no accelerator.

Forward, per chunk of time steps: one GEMM for the input terms of all its steps; per step
one recurrent GEMM plus the cell's :meth:`~xlstm.cells.base.Cell.step`. Backward: the
cell's coefficients for all steps at once, then per step its
:meth:`~xlstm.cells.base.Cell.step_back` plus one GEMM with the recurrent weights; after
the loop the weight gradients, the bias gradients and ``dx`` are single GEMMs and
reductions over the stacked pre-activation gradients (the notebook's equations (11)-(18)
and (21), for every cell).

One step frame, :func:`forward_step` and :func:`backward_step` (the recurrent products, the
cell's step, the padded rows), serves every path through an ops object: the array path runs
it through :func:`scan` with :func:`~xlstm.cells.base.array_ops`. The accelerated loops
(:func:`xlstm.accel.registry.accelerated_loops`) run the same steps over preallocated stacks,
and are handed the frame: on numpy they record it with their buffered ops, the cell's point
functions compiled by numba (bit-identical), on CuPy fused CUDA kernels do its work, on JAX
:func:`scan` runs as ``jax.lax.scan``. ``XLSTM_ACCEL=0`` or :func:`xlstm.accelerators`
turns them off.
"""

from __future__ import annotations

from .._lib.compat import c_contiguous, copy, device_of, is_writeable
from ..accel.registry import (  # noqa: F401  (re-exported: the engine's view of the registry)
    ScanLoops,
    accel_enabled,
    accelerated_loops,
    accelerators,
    cpu_loops_module,
)
from ..cells.base import NO_OUT, array_ops

#: Rows (time steps x batch) per input-projection GEMM. Bounds the temporary ``Gx`` block
#: so that memory beyond the outputs does not grow with ``T_x``.
CHUNK_ROWS = 4096


def scan(step, static, consts, carry, xs, *, reverse=False):
    """The plain time loop: ``step`` over the leading axis of every array in ``xs``.

    ``step(static, consts, carry, x_t) -> (carry, y_t)``: ``static`` is a hashable tuple of
    Python values (sizes, the namespace), ``consts`` a tuple of arrays read by every step,
    ``carry``, ``x_t`` and ``y_t`` tuples of arrays; ``x_t`` holds the ``t``-th slice of
    each array of ``xs``. Returns the last carry and the ``y_t`` stacked along a new leading
    axis (``ys[t]`` comes from ``xs[t]``, also when ``reverse`` runs the steps from last
    to first). The contract is that of ``jax.lax.scan``, which :class:`ScanLoops` puts in
    its place on JAX; ``step`` must be a module-level function so that its compiled form
    can be reused.
    """
    # Per-step tuples are built from lists: tuple() of a generator over-allocates and
    # shrinks, and the shrunk tuples pile up in CPython's free lists, so the memory
    # traced on the way would grow with the number of steps.
    xp = static[0]
    n = xs[0].shape[0]
    ys = []
    for t in range(n - 1, -1, -1) if reverse else range(n):
        carry, y = step(static, consts, carry, tuple([v[t, ...] for v in xs]))
        ys.append(y)
    if reverse:
        ys.reverse()
    return carry, tuple(xp.stack(v) for v in zip(*ys))


def _dispatch(xp, dtype, cell, masked=False, device=None):
    """``(loops, scan)``: the buffered loops (or ``None``) and the array path's loop, for
    arrays on ``device``.

    ``masked``: the run has padded steps, which the buffered loops must support
    (``loops.masks``); otherwise the array path runs.
    """
    loops = accelerated_loops(xp, dtype, cell, device=device)
    if isinstance(loops, ScanLoops):
        return None, loops.scan
    if masked and not getattr(loops, "masks", False):
        return None, scan
    return loops, scan


# ------------------------------------------------------------------------------ one step
def forward_step(ops, cell, WaT, ba, gx, state, active, out):
    """One forward step, on every path: the recurrent term ``ga = a_prev @ WaT (+ ba)``,
    the cell's :meth:`~xlstm.cells.base.Cell.step`, and the padded rows keeping their
    state.

    ``ops`` is :func:`~xlstm.cells.base.array_ops` with ``out`` = ``NO_OUT`` on the array
    path (every call returns a new array, so ``jax.lax.scan`` runs it too), or the compiled
    CPU loops' buffered ops, which record this function's calls once and replay them on
    every step. ``gx`` is the step's input term, ``state`` the previous state (a tuple in
    :attr:`~xlstm.cells.base.Cell.state_names` order), ``active`` the step's ``(m, 1)``
    booleans or ``None`` (no padding); ``out`` holds the cell's buffers and ``"ga"``, the
    recurrent term's. Returns the cell's dict of the new state and the saved values.
    """
    ga = ops.matmul(state[0], WaT, out=out["ga"])  # the recurrent term
    if ba is not None:
        ga = ops.add(ga, ba, out=out["ga"])
    new = cell.step(ops, gx, ga, state, out)
    if active is not None:  # padded rows keep their state
        for k, s in zip(cell.state_names, state):
            new[k] = ops.keep_rows(new[k], s, active, out=out[k])
    return new


def backward_step(ops, cell, WaT, da, da_rec, drest, coeffs, reads, active, out):
    """One backward step, on every path (the ops as in :func:`forward_step`): the cell's
    :meth:`~xlstm.cells.base.Cell.step_back`, the recurrent part of the gradient on
    ``a_prev``, ``(WaT @ dga^T)^T`` (equation (19)), plus the cell's direct term; a padded
    row has no gate gradients and passes the gradients on its state through.

    ``da`` is the step's upstream gradient, ``da_rec`` and ``drest`` the gradients reaching
    the step's states from the step after it; ``coeffs`` and ``reads`` as the cell's
    ``step_back`` takes them. ``out`` holds the cell's buffers (``"dGx"``, ``"dGa"``, the
    other states' gradients ``"d" + name.lower()``), ``"da_prev"`` and its transposed
    scratch ``"da_prevT"``, and ``"kept<q>"`` for the gradients reaching a padded row.
    Returns ``(dgx, dga, da_prev, drest_prev)``.
    """
    if active is not None:  # the gradients reaching the step, for its padded rows
        kept = [ops.copy(d, out=out[f"kept{q}"]) for q, d in enumerate((da_rec, *drest))]
    dgx, dga, direct, drest_prev = cell.step_back(ops, da, da_rec, drest, coeffs, reads, out)
    if active is not None:  # a padded row: no gate gradients
        dgx = ops.zero_rows(dgx, active, out=out["dGx"])
        dga = ops.zero_rows(dga, active, out=out["dGa"]) if cell.split else dgx
    da_prev = ops.transposed_matmul(WaT, dga, out=out["da_prev"], tmp=out["da_prevT"])  # (19)
    if direct is not None:
        da_prev = ops.add(direct, da_prev, out=out["da_prev"])
    if active is not None:  # ... and its state's gradients pass through
        da_prev = ops.keep_rows(da_prev, kept[0], active, out=out["da_prev"])
        drest_prev = tuple([ops.keep_rows(p, k, active, out=out["d" + s.lower()])
                            for p, k, s in zip(drest_prev, kept[1:], cell.state_names[1:])])
    return dgx, dga, da_prev, drest_prev


# ------------------------------------------------------------------------------ sequences
def _forward_step(static, consts, carry, inputs):
    """:func:`forward_step` on the array path, for :func:`scan` over the chunk's ``Gx``
    (and ``active``). Returns the new state and the step's values named in ``static[2]``.
    """
    xp, cell, names = static
    ba = consts[1] if len(consts) > 1 else None
    active = inputs[1] if len(inputs) > 1 else None
    new = forward_step(array_ops(xp), cell, consts[0], ba, inputs[0], carry, active, NO_OUT)
    return tuple([new[k] for k in cell.state_names]), tuple([new[k] for k in names])


def _backward_step(static, consts, carry, inputs):
    """:func:`backward_step` on the array path, for a reversed :func:`scan`.

    Carries the gradients reaching the step's states from the step after it (the hidden
    state's first) and returns the step's pre-activation gradients ``dgx`` (and ``dga``
    where the cell keeps them apart).
    """
    xp, cell, n_coeffs, masked = static
    da_rec, *drest = carry
    n_reads = len(cell.back_reads)
    coeffs = inputs[1 : 1 + n_coeffs]
    reads = dict(zip(cell.back_reads, inputs[1 + n_coeffs : 1 + n_coeffs + n_reads]))
    dgx, dga, da_prev, drest_prev = backward_step(
        array_ops(xp), cell, consts[0], inputs[0], da_rec, tuple(drest), coeffs, reads,
        inputs[-1] if masked else None, NO_OUT,
    )
    return (da_prev, *drest_prev), ((dgx, dga) if cell.split else (dgx,))


class _Collect:
    """Gathers blocks along a leading time axis into one array of ``length`` rows.

    A single block that covers everything is returned as it is. Otherwise, where the
    namespace allows writes, the result is preallocated and filled block by block, so peak
    memory is the result plus one block; elsewhere (JAX) the blocks are concatenated.
    """

    def __init__(self, xp, length, like):
        self.xp, self.length, self.like = xp, length, like
        self.blocks = []  # (start, block) pairs while no buffer is allocated
        self.buf = None

    def put(self, start, block):
        if self.buf is None and block.shape[0] < self.length and is_writeable(self.like):
            self.buf = self.xp.empty(
                (self.length, *block.shape[1:]), dtype=block.dtype, device=device_of(block)
            )
            for s0, b in self.blocks:
                self.buf[s0 : s0 + b.shape[0], ...] = b
            self.blocks = []
        if self.buf is not None:
            self.buf[start : start + block.shape[0], ...] = block
        else:
            self.blocks.append((start, block))

    def result(self):
        if self.buf is not None:
            return self.buf
        if len(self.blocks) == 1:
            return self.blocks[0][1]
        return self.xp.concat([b for _, b in self.blocks], axis=0)


def forward(cell, x, state0, params, n_a, *, xp, keep, head=None, collect=None, active=None,
            g0=None):
    """Run ``cell`` over ``x``, time-major ``(T, m, n_x)``.

    ``state0`` holds one ``(m, n_a)`` array or ``None`` (zeros) per state of the cell;
    ``head``, if given, is the output layer: ``head(params, a, xp=xp)`` maps a block of
    hidden states ``(k, m, n_a)`` to its predictions ``(k, m, n_y)``, and ``head.keys`` names
    the parameters it reads. ``collect`` names the states whose every step is
    returned (default all; the hidden state always). Returns ``(stacks, finals, Y,
    cache)``: the collected state stacks by name, ``(T+1, m, n_a)`` with the initial state
    at index 0; the final states by name, ``(m, n_a)``; ``Y`` of shape ``(T, m, n_y)``
    (``None`` without a head); and the cell's ``Cache`` when ``keep`` is true, else ``None``.
    Without ``keep``, the memory beyond the collected stacks does not grow with ``T``.

    ``active``, if given, is a ``(T, m, 1)`` boolean array: where it is false the row is
    padding and keeps its state (the cell's new values are discarded). ``g0``, if given,
    is a ``(m, k n_a)`` term added to the first step's input term (in the fused layout of
    ``cell.fuse_forward``): the projected LSTM's recurrent term of its initial state.
    """
    T, m, n_x = x.shape
    dtype, dev = x.dtype, device_of(x)
    if keep:
        # What the backward pass reads is fixed now: a later write into the caller's
        # arrays, or a key rebound in their dict, cannot change the gradients.
        keys = (*cell.param_keys(params), *(() if head is None else head.keys))
        params = {k: copy(params[k]) for k in keys}
    WxT, bx, WaT, ba = cell.fuse_forward(params, n_a, xp=xp)
    # The recurrent weights C-ordered (one small copy per call): BLAS runs the small per-step
    # product faster on them than on a transposed view, with the same results (the
    # performance page has the figures).
    WaT = c_contiguous(WaT)
    consts = (WaT,) if ba is None else (WaT, ba)
    zeros = None
    state = []
    for s in state0:
        if s is None:
            if zeros is None:
                zeros = xp.zeros((m, n_a), dtype=dtype, device=dev)
            state.append(zeros)
        else:
            state.append(s)
    state = cell.start(tuple(state), xp=xp)
    if keep:
        # A time-major copy, so that a later write into the caller's x cannot change what
        # the backward pass computes.
        X = xp.reshape(x, (T * m, n_x), copy=True)

    loops, run = _dispatch(xp, dtype, cell, active is not None, dev)
    chunk = max(1, min(T, CHUNK_ROWS // m))
    first = cell.state_names[0]
    if keep or collect is None:
        collect = cell.state_names
    full = tuple(k for k in cell.state_names if k == first or k in collect)
    names = (*cell.state_names, *cell.saved) if keep else cell.state_names
    collected = ("Y",) if loops is not None else (*(k for k in names if k in full or k in cell.saved), "Y")
    if head is None:
        collected = collected[:-1]
    outs = {k: _Collect(xp, T + 1 if k in cell.state_names else T, x) for k in collected}
    if loops is not None:  # preallocated stacks, written in place step by step
        slots = T if keep else 1  # inference reuses one slot of the saved stacks
        # a state that is not returned step by step alternates between two slots
        bufs = {k: xp.empty((T + 1 if k in full else 2, m, n_a), dtype=dtype, device=dev)
                for k in cell.state_names}
        for k, w in cell.saved.items():
            bufs[k] = xp.empty((slots, m, w * n_a), dtype=dtype, device=dev)
        for k, s in zip(cell.state_names, state):
            bufs[k][0, ...] = s
    else:
        for k, s in zip(cell.state_names, state):
            if k in full:
                outs[k].put(0, s[None, ...])
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        if keep:
            rows = X[t0 * m : t1 * m, :]
        else:
            # C-ordered like X above, so that both paths' input GEMMs round alike (numpy
            # < 2.3 takes another kernel for a strided operand)
            rows = c_contiguous(
                xp.reshape(x[t0:t1, ...], ((t1 - t0) * m, n_x))
            )
        Gx = rows @ WxT
        if is_writeable(Gx):  # in place: another fresh block this size costs page faults
            Gx += bx
        else:
            Gx = Gx + bx
        Gx = xp.reshape(Gx, (t1 - t0, m, WxT.shape[1]))
        if t0 == 0 and g0 is not None:
            if is_writeable(Gx):
                Gx[0, ...] += g0
            else:
                Gx = xp.concat([(Gx[0, ...] + g0)[None, ...], Gx[1:, ...]], axis=0)
        if loops is not None:
            sl = slice(t0, t1) if keep else slice(0, 1)
            chunk_bufs = {k: bufs[k] for k in cell.state_names}
            chunk_bufs.update((k, bufs[k][sl, ...]) for k in cell.saved)
            loops.forward(cell, Gx, WaT, ba, chunk_bufs, t0,
                          None if active is None else active[t0:t1, ...], forward_step)
            A_new = bufs[first][t0 + 1 : t1 + 1, ...]
        else:
            xs = (Gx,) if active is None else (Gx, active[t0:t1, ...])
            state, ys = run(_forward_step, (xp, cell, names), consts, state, xs)
            blocks = dict(zip(names, ys))
            for k, block in blocks.items():
                if k in outs:
                    outs[k].put(t0 + 1 if k in cell.state_names else t0, block)
            A_new = blocks[first]
        if head is not None:
            outs["Y"].put(t0, head(params, A_new, xp=xp))
    res = {k: v.result() for k, v in outs.items()}
    if loops is not None:
        res.update(bufs)
        finals = {k: bufs[k][T % bufs[k].shape[0], ...] for k in cell.state_names}
    else:
        finals = dict(zip(cell.state_names, state))
    stacks = {k: res[k] for k in full}
    kept = None
    if keep:
        kept = cell.Cache(**{k: res[k] for k in names}, X=X, params=params, n_a=n_a)
    return stacks, finals, res.get("Y"), kept


def backward(cell, da, cache, *, xp, dstate=None, active=None, first=False):
    """Backward pass over the first ``T_da = da.shape[0]`` steps of a forward pass, from its
    ``cache`` (the cell's ``Cache``).

    ``da`` is time-major ``(T_da, m, n_a)``; ``dstate``, if given, holds the gradients on
    the state after step ``T_da`` (``(m, n_a)`` each, ``None`` for zero).
    Returns ``(dX, dstate0, grads)``: ``dX`` time-major ``(T_da, m, n_x)``, ``dstate0``
    the gradients on the initial state (``(m, n_a)`` each) and ``grads`` the parameter
    gradients in the cell's names (:meth:`~xlstm.cells.base.Cell.unfuse_grads`).
    ``active`` is the forward pass's (:func:`forward`): a padded row's step has no gate
    gradients, ignores its ``da`` (the caller's output there is zero) and passes the
    gradients on its state through. ``first=True`` appends the gradient on the first
    step's input term, ``(m, k n_a)`` (that of :func:`forward`'s ``g0``).
    """
    n_a = cache.n_a
    T, m = da.shape[0], da.shape[1]
    dtype, dev = da.dtype, device_of(da)
    WaT, Wx = cell.fuse_backward(cache.params, n_a, xp=xp)
    saved = {k: getattr(cache, k)[:T, ...] for k in cell.saved}
    prev = {k: getattr(cache, k)[:T, ...] for k in cell.state_names}
    da_t = da
    zeros = xp.zeros((m, n_a), dtype=dtype, device=dev)
    given = (None,) * len(cell.state_names) if dstate is None else dstate
    # a state that carries no gradient (the sLSTM's stabilizer) starts from zeros too
    carry = tuple(zeros if g is None or k in cell.frozen else g
                  for k, g in zip(cell.state_names, given))
    if active is not None:
        active = active[:T, ...]
    loops, run = _dispatch(xp, dtype, cell, active is not None, dev)
    width = cell.n_gates * n_a
    if loops is not None:
        dGx = xp.empty((T, m, width), dtype=dtype, device=dev)
        dGa = xp.empty((T, m, width), dtype=dtype, device=dev) if cell.split else dGx
        carry = loops.backward(cell, da_t, carry, saved, prev, WaT, dGx, dGa, active,
                               backward_step)
    else:
        ops = array_ops(xp)
        coeffs = cell.back_coeffs(ops, saved, prev, NO_OUT)  # all steps at once
        reads = tuple({**saved, **prev}[k] for k in cell.back_reads)
        masks = () if active is None else (active,)
        carry, ys = run(_backward_step, (xp, cell, len(coeffs), active is not None), (WaT,),
                        carry, (da_t, *coeffs, *reads, *masks), reverse=True)
        dGx = ys[0]
        dGa = ys[1] if cell.split else dGx
    dGx = xp.reshape(dGx, (T * m, width))
    dGxT = xp.matrix_transpose(dGx)
    dGaT = xp.matrix_transpose(xp.reshape(dGa, (T * m, width))) if cell.split else dGxT
    A_prev = xp.reshape(prev[cell.state_names[0]], (T * m, n_a))
    dWa = dGaT @ A_prev  # (11)-(14), recurrent columns
    dWx = dGxT @ cache.X[: T * m, :]  # (11)-(14), input columns
    dbx = xp.sum(dGxT, axis=1, keepdims=True)  # (15)-(18)
    dba = xp.sum(dGaT, axis=1, keepdims=True) if cell.split else dbx
    dX = xp.reshape(dGx @ Wx, (T, m, Wx.shape[1]))  # (21)
    grads = cell.unfuse_grads(dWx, dWa, dbx, dba, xp=xp, params=cache.params)
    if first:
        return dX, tuple(carry), grads, dGx[:m, ...]
    return dX, tuple(carry), grads
