"""The contract between the time loop (:mod:`xlstm.engine.loop`) and a recurrent cell.

The engine runs every cell the same way. Time-major, batch in rows: a step's input is a row
block ``x_t (m, n_x)``, a state is ``(m, n_a)``, and for a chunk of steps

* one GEMM gives the input term of all its steps, ``gx = x_t @ WxT + bx`` (``(m, k n_a)``
  per step, ``k`` = :attr:`Cell.n_gates`);
* per step, one GEMM gives the recurrent term ``ga = a_prev @ WaT (+ ba)`` from the first
  state (the hidden state ``a``, which is also the output), and :meth:`Cell.step` does the
  rest;
* backward, per step, :meth:`Cell.step_back` gives the gradients of both terms, ``dgx`` and
  ``dga``, and the engine adds ``dga @ Wa`` to the gradient reaching ``a_prev``; after the
  loop ``dWx = dGx^T X``, ``dWa = dGa^T A_prev``, ``dbx``/``dba`` are sums: single GEMMs
  and reductions, equations (11)-(18) and (21) of the LSTM notebook for every cell.

A cell's pointwise math is written once, as *point functions*: plain Python arithmetic on
their arguments (``+``, ``-``, ``*``), with every constant passed in as an argument, never a
literal (so that a float32 step stays float32 everywhere). The same function runs on whole
arrays on the array path and element by element, compiled, in the accelerated loops. A
cell's :meth:`~Cell.step` and :meth:`~Cell.step_back` combine point functions, ``tanh``,
``relu`` and ``sign`` through an *ops* object: :class:`ArrayOps` on the array path (every
call returns a new array), a buffered one in the accelerated loops (every call writes into
``out``). These functions are always the namespace's own, so both routes round alike. The
engine's step frame around a cell's step (the recurrent products, the padded rows) runs
through the same ops object: ``matmul``, ``transposed_matmul``, ``keep_rows`` and
``zero_rows``.

Two rules make a step fast in the compiled loops, which record a cell's first step and
replay its calls on every later step's arrays: the operations of a step must not depend on
the values, and a step hands its ops only the arrays it was given (its arguments and its
``out`` buffers), with gate columns taken through ``ops.cols`` and ``ops.blocks``, never a
slice it makes itself. A step that breaks the second rule still gives the same numbers, but
runs its Python on every step (the conformance suite checks that every cell replays).
"""

from __future__ import annotations

import functools
from collections import namedtuple
from collections.abc import Mapping
from typing import Any

from .._lib.compat import c_contiguous, copy

__all__ = ["Cell", "CELLS", "ArrayOps", "array_ops", "NO_OUT", "cell_named", "register",
           "stacked_transpose", "TwoBiasCell"]


#: Every cell, by name: the one registry of cells. Each cell module registers its cells
#: (:func:`register`) and ``xlstm.cells`` imports every cell module; the CUDA kernels, the
#: compiled CPU loops, the models' layers and the tests find cells here.
CELLS: dict[str, Cell] = {}


def register(cell: Cell) -> Cell:
    """Add ``cell`` to :data:`CELLS` under its name, and return it."""
    if not cell.name or CELLS.get(cell.name, cell) is not cell:
        raise ValueError(f"a cell needs a name of its own; {cell.name!r} is taken or empty")
    CELLS[cell.name] = cell
    return cell


def cell_named(name: str) -> Cell:
    """The cell instance called ``name`` (``"lstm"``, ``"gru"``, ``"rnn_tanh"``, ...)."""
    try:
        return CELLS[name]
    except KeyError:
        raise ValueError(f"no cell is named {name!r}; the cells are {sorted(CELLS)}") from None


class _NoOut(Mapping):
    """The ``out`` of the array path: every destination is ``None`` (allocate)."""

    def __getitem__(self, key):
        return None

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0

    def __repr__(self):
        return "NO_OUT"


#: Passed as ``out`` on the array path: no destination buffers.
NO_OUT = _NoOut()


class ArrayOps:
    """The array path's operations for a cell's step: each call returns a new array.

    ``out`` is accepted and ignored, so that a cell's step reads the same on both routes.
    """

    #: Whether ``out`` buffers are written (the accelerated loops) or ignored (here).
    buffered = False

    def __init__(self, xp):
        self.xp = xp

    def const(self, value: float) -> float:
        """A constant for a point function: a Python float, which keeps the arrays' dtype."""
        return value

    def tanh(self, x, out=None):
        return self.xp.tanh(x)

    def relu(self, x, out=None):
        """``max(x, 0)``, the namespace's ``maximum`` against zeros (NaN stays NaN)."""
        return self.xp.maximum(x, self.xp.zeros_like(x))

    def sign(self, x, out=None):
        return self.xp.sign(x)

    def exp(self, x, out=None):
        return self.xp.exp(x)

    def log1p(self, x, out=None):
        return self.xp.log1p(x)

    def maximum(self, x, y, out=None):
        return self.xp.maximum(x, y)

    def add(self, x, y, out=None):
        return x + y

    def mul(self, x, y, out=None):
        return x * y

    def copy(self, x, out=None):
        """``x`` itself: the array path never writes into it afterwards."""
        return x

    def concat(self, parts, out=None):
        """The parts side by side along the last axis (gate blocks into one array)."""
        return self.xp.concat(list(parts), axis=-1)

    def blocks(self, buf, k):
        """The ``k`` column blocks of ``buf`` (``k`` Nones without a buffer): splatted into
        :meth:`map`'s arguments or outputs, ``k`` of them."""
        if buf is None:
            return (None,) * k
        n = buf.shape[-1] // k
        return tuple([buf[..., q * n : (q + 1) * n] for q in range(k)])

    def cols(self, buf, start, stop):
        """Columns ``start:stop`` of ``buf`` (the last axis); ``None`` without a buffer."""
        return None if buf is None else buf[..., start:stop]

    def map(self, fn, *args, out=None):
        """``fn(*args)`` on whole arrays: a point function applied elementwise."""
        return fn(*args)

    # the engine's step frame (:func:`xlstm.engine.loop.forward_step`, ``backward_step``)
    def matmul(self, a, b, out=None):
        """``a @ b`` (the recurrent term ``a_prev @ WaT``)."""
        return a @ b

    def transposed_matmul(self, a, b, out=None, tmp=None):
        """``b @ a^T``, made as ``(a @ b^T)^T`` (the recurrent part of ``da_prev``, ``(WaT
        @ dga^T)^T``); ``tmp`` is the buffered route's scratch for ``a @ b^T``."""
        xp = self.xp
        return xp.matrix_transpose(a @ xp.matrix_transpose(b))

    def keep_rows(self, new, old, active, out=None):
        """``new``, with ``old`` in the padded rows (where the ``(m, 1)`` booleans
        ``active`` are false)."""
        return self.xp.where(active, new, old)

    def zero_rows(self, x, active, out=None):
        """``x``, with zeros in the padded rows (where ``active`` is false)."""
        return self.xp.where(active, x, self.xp.zeros_like(x))


@functools.cache
def array_ops(xp) -> ArrayOps:
    """The :class:`ArrayOps` of namespace ``xp`` (one per namespace)."""
    return ArrayOps(xp)


class Cell:
    """A recurrent cell, as the engine runs it. Subclasses set the class attributes.

    Attributes
    ----------
    name : str
        Short name (``"lstm"``, ``"gru"``, ``"rnn_tanh"``...); accelerators register by it.
    state_names : tuple of str
        Names of the state stacks, ``(T+1, m, n_a)`` each, index 0 holding the initial
        state. The first is the hidden state ``a``: the output of every step and the input
        of the recurrent GEMM.
    saved : dict of str to int
        Stacks kept per step for the backward pass, ``(T, m, w n_a)``, name to width ``w``.
    n_gates : int
        Width of the input and recurrent terms in units of ``n_a``.
    split : bool
        Whether the recurrent term's gradient ``dga`` differs from the input term's
        ``dgx`` (GRU: ``r * (W_hn a + b_hn)``); otherwise the engine keeps one stack.
    back_reads : tuple of str
        The saved and state stacks that :meth:`step_back` reads, by name.
    scratch : dict of str to int
        Per-step buffers the accelerated loops give ``step`` and ``step_back`` as ``out``,
        name to width.
    coeffs : dict of str to int
        The outputs of :meth:`back_coeffs`, name to width: the accelerated loops give it
        buffers of these names for all steps at once.
    inline_coeffs : bool
        Whether the compiled loops skip :meth:`back_coeffs` and call :meth:`step_back` with
        ``coeffs=None``, the step then forming its coefficients itself, in the point
        function it maps (which calls :meth:`back_coeffs`' point function), so that they
        never pass through memory. The array path always forms them for all steps first.
    """

    name: str = ""
    state_names: tuple[str, ...] = ("A",)
    saved: dict[str, int] = {}
    n_gates: int = 1
    split: bool = False
    back_reads: tuple[str, ...] = ()
    scratch: dict[str, int] = {}
    coeffs: dict[str, int] = {}
    inline_coeffs: bool = False
    #: States that carry no gradient (their output does not depend on them): their
    #: gradient is zero, whatever the gradient given on the final state.
    frozen: tuple[str, ...] = ()
    #: States that a valid state has positive (a normaliser).
    positive: tuple[str, ...] = ()
    #: States kept in the scale of a frozen stabiliser: defined up to that scale, so that
    #: only a loss on the other states is a function of the inputs alone.
    scaled: tuple[str, ...] = ()
    #: The gates in the order of the parameter dict's keys (``W<g>, b<g>`` each, then
    #: ``bh<g>`` each), and in torch's row order.
    dict_gates: tuple[str, ...] = ()
    torch_gates: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        fields = (*cls.state_names, *cls.saved, "X", "params", "n_a")
        cache = namedtuple(f"{cls.__name__}Cache", fields)
        cache.__doc__ = (
            f"The forward record of the {cls.__name__}, kept for the backward pass: the "
            f"state stacks {', '.join(cls.state_names)} ``(T+1, m, n_a)``, the saved stacks "
            f"{', '.join(cls.saved) or '(none)'} ``(T, m, w n_a)``, ``X`` the time-major "
            "``(T*m, n_x)`` input, ``params`` a copy of the parameters taken by the forward "
            "pass and ``n_a`` the hidden size."
        )
        cache.__module__ = cls.__module__  # pickle finds it as ``<cell class>.Cache``
        cache.__qualname__ = f"{cls.__qualname__}.Cache"
        cls.Cache = cache

    def __repr__(self):
        return f"<cell {self.name}>"

    def __reduce__(self):  # one instance per cell, also after a pickle round trip
        return (cell_named, (self.name,))

    # ----------------------------------------------------------------- parameters
    def param_keys(self, params: Mapping) -> tuple[str, ...]:
        """The keys of ``params`` that the cell reads (what a forward pass snapshots)."""
        raise NotImplementedError

    def param_shapes(self, n_x: int, n_a: int) -> dict[str, tuple[int, int]]:
        """The parameter dict of one layer of a model class: key to shape, in order.

        By default, per gate ``g`` of :attr:`dict_gates`: ``W<g> (n_a, n_a + n_x)`` acting on
        ``[a_prev; x_t]``, ``b<g> (n_a, 1)``, then torch's second bias ``bh<g> (n_a, 1)``.
        """
        shapes = {}
        for g in self.dict_gates:
            shapes["W" + g] = (n_a, n_a + n_x)
            shapes["b" + g] = (n_a, 1)
        shapes.update(("bh" + g, (n_a, 1)) for g in self.dict_gates)
        return shapes

    def init_params(self, rng: Any, n_x: int, n_a: int, **hyper: Any) -> dict:
        """One layer's parameters as host numpy arrays, drawn from ``rng`` (numpy's
        ``Generator``), so that one seed gives the same numbers on every backend.

        By default torch's initialisation of its recurrent layers: every weight and bias
        uniform in ``(-k, k)``, ``k = 1 / sqrt(n_a)``, drawn as torch's ``weight_ih,
        weight_hh, bias_ih, bias_hh`` and laid out by :meth:`from_torch_arrays`.
        ``hyper`` holds the cell's other sizes (the sLSTM's ``num_heads``).
        """
        import numpy as np

        k = 1.0 / np.sqrt(n_a)
        rows = self.n_gates * n_a
        w_ih = rng.uniform(-k, k, size=(rows, n_x))
        w_hh = rng.uniform(-k, k, size=(rows, n_a))
        b_ih = rng.uniform(-k, k, size=rows)
        b_hh = rng.uniform(-k, k, size=rows)
        return self.from_torch_arrays(w_ih, w_hh, b_ih, b_hh)

    def param_grads(self, grads: Mapping, keys: Any) -> dict:
        """The gradients of one layer keyed like its parameters (``keys``, in order), from
        the gradients :meth:`unfuse_grads` gives (``"d" + key``). By default a second bias
        that the cell adds to the first (torch's ``bias_hh`` of a gate, ``bh<g>``, which
        :meth:`unfuse_grads` does not name) has the first's gradient, as a copy."""
        return {k: grads["d" + k] if "d" + k in grads else copy(grads["db" + k[2:]])
                for k in keys}

    def from_torch_arrays(self, w_ih, w_hh, b_ih, b_hh) -> dict:
        """One layer's dict (host numpy arrays) from torch's ``weight_ih, weight_hh,
        bias_ih, bias_hh`` of that layer and direction (host numpy arrays). ``weight_hh``
        may have fewer columns than rows per gate (the LSTM's projection: its recurrent
        input is the projected state)."""
        import numpy as np

        n_a = w_hh.shape[0] // self.n_gates
        out = {}
        for j, g in enumerate(self.torch_gates):
            rows = slice(j * n_a, (j + 1) * n_a)
            out["W" + g] = np.concatenate([w_hh[rows], w_ih[rows]], axis=1)
            out["b" + g] = b_ih[rows].reshape(n_a, 1).copy()
            out["bh" + g] = b_hh[rows].reshape(n_a, 1).copy()
        return {k: out[k] for k in self.param_shapes(w_ih.shape[1], n_a)}

    def to_torch_arrays(self, layer: Mapping, n_rec: int | None = None) -> tuple:
        """Inverse of :meth:`from_torch_arrays`: ``(w_ih, w_hh, b_ih, b_hh)``; ``n_rec`` is
        the width of the recurrent input (default ``n_a``; the projection's size for a
        projected LSTM)."""
        import numpy as np

        n_rec = layer["W" + self.torch_gates[0]].shape[0] if n_rec is None else n_rec
        W = np.concatenate([layer["W" + g] for g in self.torch_gates], axis=0)
        b = np.concatenate([layer["b" + g] for g in self.torch_gates], axis=0).reshape(-1)
        bh = np.concatenate([layer["bh" + g] for g in self.torch_gates], axis=0).reshape(-1)
        return W[:, n_rec:], W[:, :n_rec], b, bh

    def fuse_forward(self, params: Mapping, n_a: int, *, xp: Any):
        """``(WxT, bx, WaT, ba)``: ``(n_x, k n_a)``, ``(1, k n_a)``, ``(n_a, k n_a)`` and
        ``(1, k n_a)`` or ``None``, as the forward step reads them."""
        raise NotImplementedError

    def fuse_backward(self, params: Mapping, n_a: int, *, xp: Any):
        """``(WaT, Wx)``: ``(n_a, k n_a)`` and ``(k n_a, n_x)``, the weights as the gradients
        ``dga`` and ``dgx`` multiply them."""
        raise NotImplementedError

    def unfuse_grads(self, dWx, dWa, dbx, dba, *, xp: Any, params: Mapping | None = None) -> dict:
        """The gradients of the fused weights in the cell's own parameter names (``params``:
        the parameters of the forward pass, for a cell whose layout depends on them)."""
        raise NotImplementedError

    def start(self, state: tuple, *, xp: Any) -> tuple:
        """The initial state as the steps read it, from the ``(m, n_a)`` arrays given (by
        default unchanged)."""
        return state

    # ------------------------------------------------------------------- one step
    def step(self, ops, gx, ga, state: tuple, out: Mapping) -> dict:
        """One forward step: from the two terms and the previous state, the new state and
        the saved values, by name (:attr:`state_names` and :attr:`saved`)."""
        raise NotImplementedError

    def back_coeffs(self, ops, saved: Mapping, prev: Mapping, out: Mapping) -> tuple:
        """Factors of the backward step that depend on the forward pass only.

        ``saved`` and ``prev`` (the state before the step) may be one step's slices or,
        on the array path, whole stacks: these are point functions, vectorised over time.
        """
        return ()

    def step_back(self, ops, da, da_rec, drest: tuple, coeffs: tuple, reads: Mapping,
                  out: Mapping) -> tuple:
        """One backward step: ``(dgx, dga, da_direct, drest_prev)``.

        ``da`` is the upstream gradient on the step's output and ``da_rec`` the gradient
        reaching it from the next step; ``drest`` holds the gradients on the other states,
        ``coeffs`` what :meth:`back_coeffs` gave for the step and ``reads`` the step's
        slices of the stacks named in :attr:`back_reads`. ``da_direct`` is the gradient on
        ``a_prev`` other than through ``ga`` (or ``None``), ``drest_prev`` the gradients on
        the other previous states. In the accelerated loops, the gradients on the other
        states are updated in place: ``out["d" + name.lower()]`` is ``drest``'s buffer, and
        ``coeffs`` is ``None`` for a cell with :attr:`inline_coeffs`.
        """
        raise NotImplementedError


def stacked_transpose(blocks, *, xp):
    """``[B_o; B_f; B_i; B_c]^T``: the transpose of one fresh ``(4 n_a, n_a + n_x)`` stack.

    The stack is C-ordered on numpy and CuPy whatever the blocks' order, so the products
    that read its transposed blocks ``Wa^T`` and ``Wx^T`` see one layout, and round the
    same, for C- and Fortran-ordered parameters alike. The products read ``Wa`` and ``Wx``
    as transposed operands, which BLAS runs faster than a C-ordered ``Wa^T`` (the
    performance page has the figures).
    """
    return xp.matrix_transpose(c_contiguous(xp.concat(blocks, axis=0)))


class TwoBiasCell(Cell):
    """The parameter layout of a cell whose recurrent term keeps a bias of its own (the GRU,
    the MGU): per gate ``g`` of :attr:`gates`, ``W<g> (n_a, n_a + n_x)`` acting on ``[a_prev;
    x_t]``, the input bias ``b<g>`` and the recurrent bias ``bh<g>`` (torch's ``bias_hh``);
    the input term ``x WxT + bx`` and the recurrent term ``a WaT + ba`` fused apart, the rows
    of the gates in :attr:`halved` halved (exact in binary floating point), so that one
    ``tanh`` gives their sigmoid."""

    split = True
    #: The gates, in the order of the fused blocks (and of the parameter dict).
    gates: tuple[str, ...] = ()
    #: The sigmoid gates, whose rows the fused weights hold halved.
    halved: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.weight_keys = tuple("W" + g for g in cls.gates)
        cls.bias_keys = tuple("b" + g for g in cls.gates)
        cls.hidden_bias_keys = tuple("bh" + g for g in cls.gates)

    def param_keys(self, params):
        return (*(k for g in self.gates for k in ("W" + g, "b" + g)), *self.hidden_bias_keys)

    def _fused(self, params, prefix):
        return [0.5 * params[prefix + g] if g in self.halved else params[prefix + g]
                for g in self.gates]

    def fuse_forward(self, params, n_a, *, xp):
        WT = stacked_transpose(self._fused(params, "W"), xp=xp)
        bx = xp.concat(self._fused(params, "b"))
        ba = xp.concat(self._fused(params, "bh"))
        width = (1, len(self.gates) * n_a)
        return WT[n_a:, :], xp.reshape(bx, width), WT[:n_a, :], xp.reshape(ba, width)

    def fuse_backward(self, params, n_a, *, xp):
        WT = stacked_transpose([params[k] for k in self.weight_keys], xp=xp)
        return WT[:n_a, :], xp.matrix_transpose(WT[n_a:, :])

    def unfuse_grads(self, dWx, dWa, dbx, dba, *, xp, params=None):
        """``dW* = [dWa*, dWx*]`` (recurrent and input columns), ``db*`` and ``dbh*``."""
        n = dbx.shape[0] // len(self.gates)
        dW = xp.concat([dWa, dWx], axis=1)
        out = {}
        for j, g in enumerate(self.gates):
            out["dW" + g] = dW[j * n : (j + 1) * n, :]
            out["db" + g] = dbx[j * n : (j + 1) * n, :]
        out.update((f"dbh{g}", dba[j * n : (j + 1) * n, :]) for j, g in enumerate(self.gates))
        return out
