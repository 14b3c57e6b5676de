"""Model classes: ``LSTM``, ``GRU`` and ``RNN``, one cell each, on the one engine.

A model holds its parameters as a list with one dict per (layer, direction), indexed
``layer * D + direction`` like torch's ``h_n`` (``D`` is 2 when bidirectional), and runs
them with the engine of :mod:`xlstm.engine.loop`. ``forward`` returns the outputs, the final
state and a cache; ``backward`` takes the gradient on the outputs (and optionally on the
final state) and returns the gradients on the input, on the initial state and on every
parameter, the last in exactly the structure of ``params``.

Shapes, ``layout="notebook"``: ``x (n_x, m, T)``, ``y (D n_a, m, T)``, every state array
``(num_layers D, n_a, m)``. The LSTM's state is ``(a, c)``, the GRU's and the RNN's
``(a,)``.

``layout="batch_first"``: ``x (m, T, n_x)`` and ``y (m, T, D n_a)``. Layer ``k > 0`` reads
the full output of layer ``k - 1``, ``[forward; reverse]`` per step; the reverse direction
runs the engine over the time-reversed input. Dropout between layers (``train=True``)
multiplies each layer's output but the last by a mask drawn on the host from ``seed``
(numpy's ``default_rng``) and moved to the arrays' namespace and device, so one seed gives
the same masks on every backend.

``lengths`` gives torch's PackedSequence semantics: past each sequence's length its state
is frozen and its output is zero, its final state is the one at its own length, and its
reverse direction starts at its own end (the time axis reversed within each length, by a
gather). Padding is never read: the input past each length, and the gradient on the output
there, are replaced by zeros once, at the model's edge, so that no layer, cell or form
sees them.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._lib.checks import positive_int, seed_value
from .._lib.compat import (
    copy,
    device_of,
    device_scope,
    is_concrete,
    namespace,
    namespace_of_module,
    on_input_device,
    resolve_dtype,
)
from .._lib.typing import Array
from ..cells.base import Cell
from ..cells.gru import GRU_CELL
from ..cells.lstm import LSTM_CELL
from ..cells.rnn import RNN_RELU, RNN_TANH
from ..cells.slstm import FORGET_GATES, SLSTM_CELL, SLSTM_EXP_CELL
from ..engine import loop as _engine

__all__ = ["LSTM", "GRU", "RNN", "SLSTM", "ModelCache"]

_LAYOUTS = ("notebook", "batch_first")


class ModelCache:
    """What a model's ``forward`` keeps for its ``backward``: the engine's stacked state of
    every (layer, direction), and the configuration that made it.

    Treat it as opaque. It holds copies, so later writes into the inputs, the parameters or
    the outputs do not change the gradients. It can be copied and pickled as far as the
    arrays of its namespace can.
    """

    __slots__ = ("cell", "config", "m", "states", "masks", "pad")

    def __init__(self, cell: Cell, config: tuple, m: int, states: tuple,
                 masks: tuple = (), pad: tuple | None = None) -> None:
        self.cell, self.config, self.m, self.states = cell, config, m, states
        self.masks = masks  # the dropout mask after each layer but the last, or None
        self.pad = pad  # (active, order) of a padded batch (see _Model._padding), or None

    def __reduce__(self):
        return (type(self), (self.cell, self.config, self.m, self.states, self.masks,
                             self.pad))

    def __repr__(self):
        T = self.states[0].X.shape[0] // self.m
        return f"ModelCache({self.config[0]}, m={self.m}, T={T})"


class _Model:
    """The machinery shared by every model class; subclasses name their cell."""

    #: The cell of the model (the RNN picks one per nonlinearity).
    cell: Cell
    #: The torch module class of the same model, by name in ``torch.nn`` (None: none).
    torch_name: str | None

    def __init__(
        self, n_x: int, n_a: int, *, num_layers: int = 1, bidirectional: bool = False,
        dropout: float = 0.0, layout: str = "notebook", xp: Any = None, dtype: Any = None,
        device: Any = None, seed: int | np.random.Generator | None = 0,
    ) -> None:
        self.n_x = positive_int("n_x", n_x)
        self.n_a = positive_int("n_a", n_a)
        self.num_layers = positive_int("num_layers", num_layers)
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool, got {bidirectional!r}")
        self.bidirectional = bidirectional
        # any real number (numpy's scalars too), but not a bool
        if isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, numbers.Real) \
                or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.xp = namespace_of_module(xp)
        self.dtype = resolve_dtype(self.xp, dtype, device=device)
        self.device = device
        self.params = self._init_params(np.random.default_rng(seed_value("seed", seed,
                                                                     generator=True)))

    # ------------------------------------------------------------------ parameters
    @property
    def D(self) -> int:
        """Directions: 2 when bidirectional, else 1."""
        return 2 if self.bidirectional else 1

    def _config(self):
        return (type(self).__name__, self.cell.name, self.n_x, self.n_a, self.num_layers,
                self.D, self.layout)

    def _n_in(self, index):
        """Input features of (layer, direction) ``index``: ``n_x``, then ``D n_a``."""
        return self.n_x if index < self.D else self.D * self.n_a

    def _shapes(self, index):
        """The parameter shapes of (layer, direction) ``index``, by key."""
        return self.cell.param_shapes(self._n_in(index), self.n_a)

    def _init_params(self, rng):
        """torch's initialisation: every weight and bias uniform in ``(-k, k)``,
        ``k = 1 / sqrt(n_a)``, drawn on the host, so one seed gives the same numbers on
        every backend."""
        k = 1.0 / np.sqrt(self.n_a)
        rows = self.cell.n_gates * self.n_a
        layers = []
        for i in range(self.num_layers * self.D):
            w_ih = rng.uniform(-k, k, size=(rows, self._n_in(i)))
            w_hh = rng.uniform(-k, k, size=(rows, self.n_a))
            b_ih = rng.uniform(-k, k, size=rows)
            b_hh = rng.uniform(-k, k, size=rows)
            layers.append(self.cell.from_torch_arrays(w_ih, w_hh, b_ih, b_hh))
        return self._to_xp(layers, self.xp, self.dtype, self.device)

    @staticmethod
    def _to_xp(layers, xp, dtype, device):
        with device_scope(xp=xp, device=device):
            return [{k: xp.asarray(v, dtype=dtype, device=device) for k, v in layer.items()}
                    for layer in layers]

    def _check_params(self, params, name="params"):
        """Raise unless ``params`` has the model's structure and shapes; return its arrays
        keyed for error messages."""
        if not isinstance(params, Sequence) or isinstance(params, (str, bytes)):
            raise TypeError(
                f"{name} must be a list of {self.num_layers * self.D} dicts (one per layer "
                f"and direction), got {type(params).__name__}"
            )
        if len(params) != self.num_layers * self.D:
            raise ValueError(
                f"{name} has {len(params)} entries; this model has num_layers * D = "
                f"{self.num_layers * self.D}"
            )
        arrays = {}
        for i, layer in enumerate(params):
            n_in = self._n_in(i)
            want = self._shapes(i)
            where = f"{name}[{i}]"
            if not isinstance(layer, Mapping):
                raise TypeError(f"{where} must be a dict of arrays, got {type(layer).__name__}")
            missing = [k for k in want if k not in layer]
            extra = [k for k in layer if k not in want]
            if missing or extra:
                raise KeyError(
                    f"{where} is not a {type(self).__name__} layer ({self.cell.name} cell): "
                    + (f"missing {missing}" if missing else "")
                    + ("; " if missing and extra else "")
                    + (f"unexpected {extra}" if extra else "")
                    + f"; expected the keys {list(want)}"
                )
            for k, shape in want.items():
                got = getattr(layer[k], "shape", None)
                if got is None:
                    raise TypeError(
                        f"{where}[{k!r}] must be an array of shape {shape}, got "
                        f"{type(layer[k]).__name__}; convert it with the model's namespace "
                        f"(xp.asarray(..., dtype=model.dtype))"
                    )
                if tuple(got) != shape:
                    raise ValueError(
                        f"{where}[{k!r}] must have shape {shape} (n_in={n_in}, "
                        f"n_a={self.n_a}), got {tuple(got)}"
                    )
                arrays[f"{where}[{k!r}]"] = layer[k]
        return arrays

    def _state_arrays(self, state, name):
        """``state`` as a tuple of arrays (or None), checked for count and type."""
        if state is None:
            return None
        n = len(self.cell.state_names)
        if n == 1 and not isinstance(state, (tuple, list)):
            state = (state,)
        if not isinstance(state, (tuple, list)) or len(state) != n:
            names = [k.lower() for k in self.cell.state_names]
            what = f"({', '.join(names)}{',' if n == 1 else ''})"
            raise TypeError(f"{name} must be the tuple {what} of {type(self).__name__}, got "
                            f"{type(state).__name__}"
                            + (f" of length {len(state)}" if isinstance(state, (tuple, list))
                               else ""))
        return tuple(state)

    def _state_shapes(self, m):
        """The shape of each state array for a batch of ``m``."""
        return ((self.num_layers * self.D, self.n_a, m),) * len(self.cell.state_names)

    def _state_axes(self):
        """The axes after ``num_layers * D`` of each state array, for error messages."""
        return ("n_a, m",) * len(self.cell.state_names)

    def _check_state_shapes(self, arrays, name, m):
        """Raise unless every array has its state shape (``dstate`` may hold ``None``:
        no gradient on that part)."""
        for k, s, want, axes in zip(self.cell.state_names, arrays, self._state_shapes(m),
                                    self._state_axes()):
            if s is None and name == "dstate":
                continue
            if s is None or s.ndim != len(want) or tuple(s.shape) != want:
                got = None if s is None else tuple(s.shape)
                raise ValueError(
                    f"{name} {k.lower()} must have shape (num_layers * D, {axes}) = {want}, "
                    f"got {got}"
                )

    # ------------------------------------------------------------------ running
    def forward(
        self, x: Array, state: Any = None, *, lengths: Array | None = None,
        params: list | None = None, train: bool = False, seed: int | None = None,
        return_cache: bool = True,
    ) -> tuple[Array, tuple, ModelCache | None]:
        """Run the model over a batch of sequences.

        Parameters
        ----------
        x : array, shape (n_x, m, T), or (m, T, n_x) with ``layout="batch_first"``
            Inputs, in the namespace, dtype and device of the parameters.
        state : tuple of arrays, optional
            The initial state, each ``(num_layers * D, n_a, m)``: ``(a, c)`` for the LSTM,
            ``(a,)`` for the GRU and the RNN (a bare array is accepted too). Default zeros.
        lengths : integer array of shape (m,), optional
            Each sequence's length, in ``[1, T]``, in the namespace and on the device of
            ``x``; unsorted is fine. Torch's PackedSequence semantics: past its length a
            sequence's state is frozen and its output is zero, its final state is the one
            at its length, and its reverse direction starts at its own end. Padding is
            never read: whatever ``x`` holds past a length (NaN, inf), every result
            equals that of zero padding, and so does every gradient whatever ``dy`` holds
            there. Their range is checked where the values can be read (not under
            ``jax.jit``).
        params : list of dicts, optional
            Parameters to run with instead of ``model.params`` (same structure): the pure
            form for optimizers and ``jax.jit``.
        train : bool, optional
            Training mode: dropout between layers (none with one layer).
        seed : int, optional
            Seed of the dropout masks; required when they are drawn (``train=True``,
            ``dropout > 0`` and more than one layer).
        return_cache : bool, optional
            Default True. False keeps nothing for a backward pass (``cache`` is ``None``);
            the extra memory then does not grow with ``T``.

        Returns
        -------
        y : array, shape (D * n_a, m, T), or (m, T, D * n_a) with ``layout="batch_first"``
            The last layer's hidden state of every step, ``[forward; reverse]``.
        state : tuple of arrays
            The final state, in the layout of the ``state`` argument.
        cache : ModelCache or None
            What :meth:`backward` needs.
        """
        return self._forward(x, state, lengths=lengths, params=params, train=train, seed=seed,
                             return_cache=return_cache, opts={})

    @on_input_device
    def _forward(self, x, state, *, lengths, params, train, seed, return_cache, opts):
        """The layer loop of :meth:`forward`; ``opts`` goes to every :meth:`_layer_forward`."""
        if not isinstance(train, bool):
            raise TypeError(f"train must be a bool, got {train!r}")
        seed = seed_value("seed", seed, generator=False)
        drop = train and self.dropout > 0.0 and self.num_layers > 1
        if drop and seed is None:
            raise ValueError(
                f"seed is required with train=True and dropout={self.dropout}: the dropout "
                "masks are drawn from it"
            )
        params = self.params if params is None else params
        arrays = self._check_params(params)
        state = self._state_arrays(state, "state")
        named = {"x": x}
        if state is not None:
            named.update((f"state[{i}]", s) for i, s in enumerate(state))
        if lengths is not None:
            named["lengths"] = lengths
        self._check_x_shape(x)  # the shape first: a wrong layout is the likelier mistake
        try:
            xp = namespace(kinds={"lengths": ("integral",)}, **named, **arrays)
        except TypeError as exc:
            hint = self._mismatch_hint(x, arrays)
            if hint is None:
                raise
            raise TypeError(f"{exc}. {hint}") from None
        if self.layout == "batch_first":
            x = xp.permute_dims(x, (2, 0, 1))
        m, T = x.shape[1], x.shape[2]
        if state is not None:
            self._check_state_shapes(state, "state", m)
        pad = None if lengths is None else self._padding(lengths, m, T, xp)
        active, order = (None, None) if pad is None else pad
        keep = bool(return_cache)
        cell, D = self.cell, self.D
        masks = self._masks(seed, m, T, xp, x) if drop else (None,) * (self.num_layers - 1)
        inside = None if active is None else xp.permute_dims(active, (2, 1, 0))  # (1, m, T)
        # Padding is never read: whatever x holds past a length (NaN, inf), every layer sees
        # zeros there, so that its products (X^T dG, the mLSTM's q k^T) stay finite.
        x = _zero_outside(x, inside, xp)
        kept, finals = [], []
        inp = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                i = layer * D + d
                state0 = (None,) * len(cell.state_names) if state is None else \
                    tuple(s[i, ...] for s in state)
                y_d, fin, st = self._layer_forward(
                    i, _reverse(inp, order, xp) if d else inp, state0, params[i], xp=xp,
                    keep=keep, active=active, opts=opts)
                y_d = _zero_outside(y_d, inside, xp)  # zero past each sequence's end
                outs.append(_reverse(y_d, order, xp) if d else y_d)
                finals.append(fin)
                kept.append(st)
            inp = outs[0] if D == 1 else xp.concat(outs, axis=0)
            if layer < self.num_layers - 1 and masks[layer] is not None:
                inp = inp * masks[layer]
        y = inp
        final = tuple(copy(xp.stack([f[k] for f in finals]))
                      for k in range(len(cell.state_names)))
        if self.layout == "batch_first":
            y = xp.permute_dims(y, (1, 2, 0))
        if not keep:
            return y, final, None
        return copy(y), final, ModelCache(cell, self._config(), m, tuple(kept), tuple(masks),
                                          pad)

    def _check_x_shape(self, x):
        """Raise unless ``x`` (if it has a shape at all) has the shape of the model's layout
        and ``n_x``; the message says when ``x`` is in the other layout."""
        shape = getattr(x, "shape", None)
        if shape is None:  # not an array: the namespace check names it
            return
        shape = tuple(shape)
        first = self.layout == "batch_first"
        if len(shape) == 3 and shape[2 if first else 0] == self.n_x and min(shape) >= 1:
            return
        hint = ""
        if len(shape) == 3 and not first and shape[2] == self.n_x != shape[0]:
            hint = ('; that is the batch-first layout (m, T, n_x): build the model with '
                    'layout="batch_first"')
        elif len(shape) == 3 and first and shape[0] == self.n_x != shape[2]:
            hint = ('; that is the notebook layout (n_x, m, T): build the model with '
                    'layout="notebook" (the default)')
        want = "(m, T, n_x)" if first else "(n_x, m, T)"
        raise ValueError(f"x must have shape {want} with n_x={self.n_x} and m, T >= 1 "
                         f"(layout={self.layout!r}), got {shape}{hint}")

    def _mismatch_hint(self, x, arrays):
        """The fix when ``x`` and the parameters differ in namespace or dtype (the model
        was built for other arrays), or ``None``."""
        import array_api_compat

        p = next(iter(arrays.values()))
        if not (array_api_compat.is_array_api_obj(x) and array_api_compat.is_array_api_obj(p)):
            return None
        mine, theirs = array_api_compat.array_namespace(p), array_api_compat.array_namespace(x)
        if mine is not theirs:
            module = _module_name(x)
            return (f"The model's parameters are {_module_name(p)} arrays: build the model "
                    f"with xp={module} to run {module} inputs, or convert x")
        if x.dtype != p.dtype:
            want, got = _dtype_name(p.dtype), _dtype_name(x.dtype)
            spell = f"np.{got}" if _module_name(x) == "numpy" else repr(got)
            return (f"The model's parameters are {want}: build the model with "
                    f"dtype={spell} to run {got} inputs, or cast x to {want}")
        return None

    def _padding(self, lengths, m, T, xp):
        """``(active, order)`` of a padded batch: ``active (T, m, 1)``, whether step ``t`` of
        sequence ``b`` is within its length; ``order (m T,)``, the gather that reverses
        each sequence within its length (an involution; padding stays in place)."""
        if not xp.isdtype(lengths.dtype, "integral"):
            raise TypeError(f"lengths must have an integer dtype, got {lengths.dtype}")
        if tuple(lengths.shape) != (m,):
            raise ValueError(f"lengths must have shape (m,) = ({m},), got {tuple(lengths.shape)}")
        if is_concrete(lengths):  # under jax.jit the values cannot be read, nor checked
            lo, hi = int(xp.min(lengths)), int(xp.max(lengths))
            if lo < 1 or hi > T:
                raise ValueError(
                    f"lengths must be in [1, T] = [1, {T}], got values in [{lo}, {hi}]")
        dev = device_of(lengths)
        # in the default integer dtype: a narrow one (uint8, say) could not hold arange(T)
        # or the gather's indices up to m T
        wide = xp.__array_namespace_info__().default_dtypes(device=dev)["integral"]
        lengths = xp.astype(lengths, wide, copy=False)
        t = xp.arange(T, dtype=wide, device=dev)
        active = xp.reshape(t[:, None] < lengths[None, :], (T, m, 1))
        L, tt = lengths[:, None], t[None, :]
        src = xp.where(tt < L, L - 1 - tt, tt) + T * xp.arange(m, dtype=wide, device=dev)[:, None]
        return active, xp.reshape(src, (m * T,))

    def _check_cache(self, cache: ModelCache) -> None:
        """Refuse a cache of this model's configuration whose contents were changed after
        ``forward``: one saved state per (layer, direction), all of one kind, one dropout
        entry between layers, the padding record ``None`` or ``(active, order)``, and a
        batch size that divides the saved input's rows."""
        L, D = self.num_layers, self.D
        states, masks, pad, m = cache.states, cache.masks, cache.pad, cache.m
        problem = None
        if not isinstance(states, tuple) or len(states) != L * D:
            got = len(states) if isinstance(states, (tuple, list)) else type(states).__name__
            problem = f"it holds {got} saved states where this model keeps {L * D}"
        elif not all(type(st) is type(states[0]) and hasattr(st, "X") for st in states):
            problem = "its saved states are not all what forward keeps"
        elif not isinstance(masks, tuple) or len(masks) != L - 1:
            got = len(masks) if isinstance(masks, (tuple, list)) else type(masks).__name__
            problem = f"it holds {got} dropout entries where this model has {L - 1}"
        elif pad is not None and not (isinstance(pad, tuple) and len(pad) == 2):
            problem = "its padding record is not the (active, order) pair forward keeps"
        elif (isinstance(m, bool) or not isinstance(m, int) or m < 1
              or states[0].X.shape[0] % m):
            problem = f"its batch size {m!r} does not divide the saved input"
        if problem is not None:
            raise ValueError(f"cache was changed after forward: {problem}; pass the cache "
                             f"that this model's forward returned, unchanged")

    def _masks(self, seed, m, T, xp, like):
        """The dropout masks after each layer but the last, ``(D n_a, m, T)`` each: kept
        with probability ``1 - dropout`` and scaled by ``1 / (1 - dropout)`` (torch's
        inverted dropout), drawn on the host from ``seed``."""
        rng = np.random.default_rng(seed)
        keep = 1.0 - self.dropout
        masks = []
        for _ in range(self.num_layers - 1):
            host = (rng.random((self.D * self.n_a, m, T)) < keep) / keep
            with device_scope(xp=xp, device=self.device):
                masks.append(xp.asarray(host, dtype=like.dtype, device=device_of(like)))
        return tuple(masks)

    def _layer_forward(self, index, inp, state0, layer, *, xp, keep, active, opts):
        """Run (layer, direction) ``index`` with parameters ``layer`` over ``inp (n_in, m,
        T)`` from ``state0`` (one array per state, its shape without the leading axis, or
        ``None`` each for zeros). Returns its output ``(n_a, m, T)``, its final state (as
        ``state0``) and what :meth:`_layer_backward` needs (``None`` unless ``keep``). The
        engine runs the model's cell; a model without one overrides this."""
        cell = self.cell
        stacks, fin, _, st = _engine.forward(cell, inp, state0, layer, self.n_a, xp=xp,
                                             keep=keep, collect=(), active=active)
        y = xp.permute_dims(stacks[cell.state_names[0]][1:, ...], (2, 1, 0))
        return y, tuple(xp.matrix_transpose(fin[k]) for k in cell.state_names), st

    def _layer_backward(self, index, dy, kept, dstate, *, xp, active):
        """The backward pass of :meth:`_layer_forward`: ``dy (n_a, m, T)`` and the gradient
        on the final state (as its ``state0``; ``None`` for zero, whole or per part) to
        ``(dx (n_in, m, T), dstate0, grads)``, ``grads`` keyed like the layer's
        parameters. Past each sequence's end ``dy`` is ignored (the output is zero)."""
        given = None if dstate is None else \
            tuple(None if s is None else xp.matrix_transpose(s) for s in dstate)
        dX, d0, g = _engine.backward(self.cell, dy, kept, xp=xp, dstate=given, active=active)
        return (xp.permute_dims(dX, (2, 1, 0)), tuple(xp.matrix_transpose(d) for d in d0),
                self._layer_grads(g, kept.params, index))

    @on_input_device
    def backward(
        self, dy: Array, cache: ModelCache, dstate: Any = None
    ) -> tuple[Array, tuple, list]:
        """Backpropagation through time for a :meth:`forward` call.

        Parameters
        ----------
        dy : array, the shape of ``y``
            Gradient of the loss with respect to ``y``.
        cache : ModelCache
            The cache that :meth:`forward` returned.
        dstate : tuple of arrays, optional
            Gradient with respect to the final state (same layout as the state), for
            truncated backpropagation across chunks; default zeros, and a part given as
            ``None`` is zero.

        Returns
        -------
        dx : array, the shape of ``x``
            Gradient with respect to ``x``.
        dstate0 : tuple of arrays
            Gradient with respect to the initial state.
        grads : list of dicts
            Gradients of the parameters, in exactly the structure of ``model.params``.
        """
        if not isinstance(cache, ModelCache):
            raise TypeError(
                f"cache must be the ModelCache of {type(self).__name__}.forward, got "
                f"{type(cache).__name__}"
            )
        mine = self._config()
        if cache.cell is not self.cell or cache.config != mine:
            raise ValueError(
                f"cache comes from another model ({cache.config[0]} with a {cache.cell.name} "
                f"cell, n_x={cache.config[2]}, n_a={cache.config[3]}); this is a "
                f"{mine[0]} with n_x={self.n_x}, n_a={self.n_a}"
            )
        self._check_cache(cache)
        dstate = self._state_arrays(dstate, "dstate")
        named = {"dy": dy}
        if dstate is not None:
            named.update((f"dstate[{i}]", s) for i, s in enumerate(dstate) if s is not None)
        xp = namespace(**named, **{"cache": cache.states[0].X})
        m, D, n_a = cache.m, self.D, self.n_a
        T = cache.states[0].X.shape[0] // m
        first = self.layout == "batch_first"
        want = (m, T, D * n_a) if first else (D * n_a, m, T)
        if tuple(dy.shape) != want:
            what = "(m, T, D * n_a)" if first else "(D * n_a, m, T)"
            raise ValueError(f"dy must have the shape of y, {what} = {want}, got "
                             f"{tuple(dy.shape)}")
        if first:
            dy = xp.permute_dims(dy, (2, 0, 1))
        if dstate is not None:
            self._check_state_shapes(dstate, "dstate", m)
        grads = [None] * (self.num_layers * D)
        d0 = [None] * (self.num_layers * D)
        active, order = (None, None) if cache.pad is None else cache.pad
        # the output is zero past each length, whatever dy holds there (torch's packed
        # output has no such positions): no layer reads it
        dy = _zero_outside(dy, None if active is None else xp.permute_dims(active, (2, 1, 0)),
                           xp)
        d_out = dy
        for layer in range(self.num_layers - 1, -1, -1):
            if layer < self.num_layers - 1 and cache.masks[layer] is not None:
                d_out = d_out * cache.masks[layer]  # through the dropout after this layer
            d_in = None
            for d in range(D):
                i = layer * D + d
                dy_d = d_out[d * n_a : (d + 1) * n_a, ...]
                given = None if dstate is None else \
                    tuple(None if s is None else s[i, ...] for s in dstate)
                dy_d = _reverse(dy_d, order, xp) if d else dy_d
                dx_d, d0[i], grads[i] = self._layer_backward(i, dy_d, cache.states[i], given,
                                                             xp=xp, active=active)
                dx_d = _reverse(dx_d, order, xp) if d else dx_d
                d_in = dx_d if d_in is None else d_in + dx_d
            d_out = d_in
        dx = d_out
        if self.layout == "batch_first":
            dx = xp.permute_dims(dx, (1, 2, 0))
        dstate0 = tuple(xp.stack([d[k] for d in d0]) for k in range(len(d0[0])))
        return dx, dstate0, grads

    def _layer_grads(self, g, layer, index):
        """The gradients keyed like ``layer`` (entry ``index`` of the parameters). A second
        bias that the cell adds to the first (torch's ``bias_hh`` of every gate but the
        GRU's ``n``) has the first's gradient, as a copy."""
        out = {}
        for k in self._shapes(index):
            if "d" + k in g:
                out[k] = g["d" + k]
            else:
                out[k] = copy(g["db" + k[2:]])
        return out

    # ------------------------------------------------------------------ torch
    @classmethod
    def from_torch(cls, module: Any, *, xp: Any = None, dtype: Any = None,
                   device: Any = None) -> _Model:
        """A model with the weights of a ``torch.nn`` module of the same kind.

        Parameters
        ----------
        module : torch.nn.LSTM, torch.nn.GRU or torch.nn.RNN
            The module of this class's kind, without projections (``proj_size=0``).
            A subclass is welcome; ``bias=False`` gives zero biases.
        xp, dtype, device : optional
            Target namespace (default numpy), dtype (default the module's: float32 for
            half precision) and device.

        Returns
        -------
        model
            The model, with parameters copied from the module and its configuration:
            ``num_layers``, ``bidirectional``, ``dropout``, and ``batch_first`` as
            ``layout="batch_first"``.
        """
        from ..notebook.interop import model_from_torch

        return model_from_torch(cls, module, xp=xp, dtype=dtype, device=device)

    @classmethod
    def _need_torch_module(cls):
        if cls.torch_name is None:
            raise TypeError(f"{cls.__name__} has no torch.nn module to convert from or to")

    @classmethod
    def _torch_kwargs(cls, module):
        return {}

    def _torch_module_kwargs(self):
        return {}

    def to_torch(self) -> Any:
        """The ``torch.nn`` module of the same kind with this model's weights and
        configuration (``dropout``; ``batch_first=True`` for ``layout="batch_first"``), on
        the CPU, float64 for float64 parameters, else float32."""
        from ..notebook.interop import model_to_torch

        return model_to_torch(self)

    def __repr__(self):
        return (f"{type(self).__name__}(n_x={self.n_x}, n_a={self.n_a}, "
                f"num_layers={self.num_layers}, bidirectional={self.bidirectional})")


def _module_name(a) -> str:
    """The module a user names for array ``a``'s namespace: ``numpy``, ``torch``,
    ``jax.numpy``, ``cupy``, ``array_api_strict``."""
    top = type(a).__module__.split(".")[0]
    return {"jaxlib": "jax.numpy", "jax": "jax.numpy"}.get(top, top)


def _dtype_name(dtype) -> str:
    """``"float32"`` for any namespace's float32 dtype (and so on); else its text."""
    text = str(dtype)
    for name in ("bfloat16", "float16", "float32", "float64"):
        if name in text:
            return name
    return text


def _zero_outside(a, inside, xp):
    """``a (n, m, T)`` with zeros where ``inside (1, m, T)`` is false (past each sequence's
    length); ``a`` itself when ``inside`` is ``None`` (no padding). A new array: the
    caller's is not written."""
    if inside is None:
        return a
    return xp.where(inside, a, xp.zeros((), dtype=a.dtype, device=device_of(a)))


def _reverse(a, order, xp):
    """``a (n, m, T)`` with its time axis reversed: whole (``order`` ``None``), or within
    each sequence's length by the gather ``order`` (:meth:`_Model._padding`)."""
    if order is None:
        return xp.flip(a, axis=-1)
    n, m, T = a.shape
    return xp.reshape(xp.take(xp.reshape(a, (n, m * T)), order, axis=1), (n, m, T))


class LSTM(_Model):
    """The notebook's LSTM as a model: state ``(a, c)``; each (layer, direction) holds the
    notebook's dict ``Wf, bf, Wi, bi, Wc, bc, Wo, bo`` and torch's second biases
    ``bhf, bhi, bhc, bho`` (added to ``bf, bi, bc, bo``).

    Parameters
    ----------
    n_x, n_a : int
        Input and hidden sizes.
    num_layers : int, optional
        Stacked layers; layer ``k > 0`` reads the output of layer ``k - 1``.
    bidirectional : bool, optional
        A second direction per layer, over the reversed sequence; the output of a step is
        ``[forward; reverse]``.
    dropout : float, optional
        Dropout between layers, in ``[0, 1)`` (no effect with one layer).
    layout : {"notebook", "batch_first"}, optional
        Axis order of ``x`` and ``y``: ``(n_x, m, T)`` and ``(D n_a, m, T)``, or
        ``(m, T, n_x)`` and ``(m, T, D n_a)``.
    xp, dtype, device : optional
        Namespace (default numpy), real floating dtype and device of the parameters.
    seed : int, optional
        Seed of the initial parameters (torch's scheme, drawn on the host).
    """

    cell = LSTM_CELL
    torch_name = "LSTM"





class GRU(_Model):
    """A GRU with torch's ``nn.GRU`` semantics, ``n = tanh(W_in x + b_in + r * (W_hn a +
    b_hn))``: state ``(a,)``; each (layer, direction) holds ``Wr, br, Wz, bz, Wn, bn`` (``W*``
    of shape ``(n_a, n_a + n_x)`` acting on ``[a_prev; x_t]``) and ``bhr, bhz, bhn``.

    The parameters are those of :class:`LSTM`.
    """

    cell = GRU_CELL
    torch_name = "GRU"


class RNN(_Model):
    """An Elman RNN with torch's ``nn.RNN`` semantics, ``a_t = act(Wax x_t + Waa a_{t-1} +
    ba + bha)``: state ``(a,)``; each (layer, direction) holds ``Wax, Waa, ba, bha``.

    ``nonlinearity`` is ``"tanh"`` (default) or ``"relu"``; the other parameters are those
    of :class:`LSTM`.
    """

    torch_name = "RNN"

    def __init__(self, n_x: int, n_a: int, *, nonlinearity: str = "tanh", **kwargs: Any) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        self.cell = RNN_TANH if nonlinearity == "tanh" else RNN_RELU
        super().__init__(n_x, n_a, **kwargs)

    @classmethod
    def _torch_kwargs(cls, module):
        return {"nonlinearity": module.nonlinearity}

    def _torch_module_kwargs(self):
        return {"nonlinearity": self.nonlinearity}


class SLSTM(_Model):
    """The sLSTM of xLSTM (Beck et al. 2024): exponential input gate, a normaliser and a
    stabiliser, and a block-diagonal recurrence with ``num_heads`` heads
    (the module ``xlstm.cells.slstm`` has the equations). State ``(h, c, n, m)``; ``m`` is the
    stabiliser, which the output does not depend on: its gradient is zero. Where ``n`` of
    the initial state is zero (a zero state), that unit's memory is empty and the first
    step starts it afresh.

    Each (layer, direction) holds ``W (4, n_h, n_in)``, ``R (4, num_heads, d, d)`` with
    ``d = n_h / num_heads`` and ``b (4, n_h, 1)``, gate order ``(i, f, z, o)``; the
    recurrent term of gate ``g`` for head ``k`` is ``R[g, k] @ h_prev[k d:(k + 1) d]``.

    Parameters
    ----------
    n_x, n_h : int
        Input and hidden sizes.
    num_heads : int, optional
        Heads of the recurrence; ``n_h`` must be a multiple of it.
    forget_gate : {"sigmoid", "exp"}, optional
        ``logsigmoid(f~)`` (default) or ``f~`` itself as the forget gate's exponent.
    **kwargs
        ``num_layers``, ``bidirectional``, ``dropout``, ``layout``, ``xp``, ``dtype``,
        ``device`` and ``seed``, as for :class:`LSTM`.
    """

    torch_name = None

    def __init__(self, n_x: int, n_h: int, *, num_heads: int = 1, forget_gate: str = "sigmoid",
                 **kwargs: Any) -> None:
        self.num_heads = positive_int("num_heads", num_heads)
        n_h = positive_int("n_h", n_h)
        if n_h % self.num_heads:
            raise ValueError(f"n_h={n_h} is not divisible by num_heads={self.num_heads}")
        if forget_gate not in FORGET_GATES:
            raise ValueError(f"forget_gate must be one of {FORGET_GATES}, got {forget_gate!r}")
        self.forget_gate = forget_gate
        self.cell = SLSTM_CELL if forget_gate == "sigmoid" else SLSTM_EXP_CELL
        super().__init__(n_x, n_h, **kwargs)

    @property
    def n_h(self) -> int:
        """The hidden size (``n_a`` of the other models)."""
        return self.n_a

    def _shapes(self, index):
        return self.cell.param_shapes(self._n_in(index), self.n_a, self.num_heads)

    def _init_params(self, rng):
        """Uniform in ``(-k, k)``: ``k = 1 / sqrt(n_h)`` for ``W`` and ``b``, ``1 / sqrt(d)``
        for the heads' ``R``; drawn on the host, so one seed gives the same numbers on every
        backend."""
        layers = []
        for i in range(self.num_layers * self.D):
            shapes = self._shapes(i)
            d = shapes["R"][-1]
            layer = {}
            for key, shape in shapes.items():
                k = 1.0 / np.sqrt(d if key == "R" else self.n_a)
                layer[key] = rng.uniform(-k, k, size=shape)
            layers.append(layer)
        return self._to_xp(layers, self.xp, self.dtype, self.device)

    def _config(self):
        return (*super()._config(), self.num_heads)

    def __repr__(self):
        return (f"SLSTM(n_x={self.n_x}, n_h={self.n_a}, num_heads={self.num_heads}, "
                f"forget_gate={self.forget_gate!r}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional})")
