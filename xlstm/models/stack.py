"""The stack: the one driver of every model class (layers x directions x lengths x
dropout), over any :class:`~xlstm.models.layers.Layer`.

A model holds its parameters as a list with one dict per (layer, direction), indexed
``layer * D + direction`` like torch's ``h_n`` (``D`` is 2 when bidirectional), and runs
each with its layer. ``forward`` returns the outputs, the final state and a cache;
``backward`` takes the gradient on the outputs (and optionally on the final state) and
returns the gradients on the input, on the initial state and on every parameter, the last
in exactly the structure of ``params``.

Shapes, ``layout="notebook"``: ``x (n_x, m, T)``, ``y (D n_a, m, T)``, every state array
``(num_layers D, ..., m)`` (the layer's state shape, batch last). ``layout="batch_first"``:
``x (m, T, n_x)`` and ``y (m, T, D n_a)``. Layer ``k > 0`` reads the full output of layer
``k - 1``, ``[forward; reverse]`` per step; the reverse direction runs its layer over the
time-reversed input. Dropout between layers (``train=True``) multiplies each layer's output
but the last by a mask drawn on the host from ``seed`` (numpy's ``default_rng``) and moved
to the arrays' namespace and device, so one seed gives the same masks on every backend.

``lengths`` gives torch's PackedSequence semantics: past each sequence's length its state
is frozen and its output is zero, its final state is the one at its own length, and its
reverse direction starts at its own end (the time axis reversed within each length, by a
gather). Padding is never read: the input past each length, and the gradient on the output
there, are replaced by zeros once, at the model's edge, so that no layer, cell or form
sees them.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

import numpy as np

from .._lib.checks import positive_int, seed_value
from .._lib.compat import (
    copy,
    device_of,
    device_scope,
    is_concrete,
    namespace,
    namespace_of_module,
    namespace_or_none,
    on_input_device,
    resolve_dtype,
    to_host,
)
from .._lib.typing import Array
from .layers import CellLayer, Layer

__all__ = ["ModelCache"]

_LAYOUTS = ("notebook", "batch_first")

#: A model class's instance: what the constructor, :meth:`_Model.to` and the class
#: methods that build a model return.
_M = TypeVar("_M", bound="_Model")


class ModelCache:
    """What a model's ``forward`` keeps for its ``backward``: the engine's stacked state of
    every (layer, direction), and the configuration that made it.

    Treat it as opaque. It holds copies, so later writes into the inputs, the parameters or
    the outputs do not change the gradients. It can be copied and pickled as far as the
    arrays of its namespace can.

    Examples
    --------
    >>> import numpy as np
    >>> import xlstm
    >>> model = xlstm.GRU(3, 4)
    >>> y, state, cache = model.forward(np.zeros((3, 2, 5), dtype=np.float32))
    >>> cache
    ModelCache(GRU, m=2, T=5)
    >>> dx, dstate0, grads = model.backward(np.ones_like(y), cache)
    """

    __slots__ = ("layer", "config", "m", "states", "masks", "pad")

    def __init__(self, layer: Layer, config: tuple, m: int, states: tuple,
                 masks: tuple = (), pad: tuple | None = None) -> None:
        self.layer, self.config, self.m, self.states = layer, config, m, states
        self.masks = masks  # the dropout mask after each layer but the last, or None
        self.pad = pad  # (active, order) of a padded batch (see _Model._padding), or None

    def __reduce__(self):
        return (type(self), (self.layer, self.config, self.m, self.states, self.masks,
                             self.pad))

    def __repr__(self):
        T = self.states[0].X.shape[0] // self.m
        return f"ModelCache({self.config[0]}, m={self.m}, T={T})"


#: torch's argument names, accepted as aliases of xlstm's (``hidden_size`` is the class's
#: hidden size, ``n_a`` or ``n_h``; ``batch_first`` a bool for ``layout``).
_TORCH_NAMES = {"input_size": "n_x", "hidden_size": None, "batch_first": "layout"}
#: torch's arguments that xlstm has no counterpart for, with the fix.
_TORCH_REFUSED = {
    "bias": "xlstm's models always have biases; for bias=False set them to zero and leave "
            "them out of the optimizer",
    "proj_size": "a projection (torch's LSTMP) is the LSTM's: xlstm.LSTM(..., proj_size=k)",
}


class _ModelType(type):
    """The model classes' type: a call ``LSTM(...)`` translates torch's argument names
    (:data:`_TORCH_NAMES`) into xlstm's, and refuses a keyword the class does not take
    with a message naming the class and its arguments (not ``_Model.__init__``)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **_torch_aliases(cls, kwargs))


def _accepted(cls) -> list[str]:
    """The keyword arguments of ``cls``'s constructor, its own and the stack's, in order."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) \
                    and p.name not in names:
                names.append(p.name)
        if klass is _Model:
            break
    return names


def _torch_aliases(cls, kwargs: dict) -> dict:
    """``kwargs`` with torch's names for xlstm's (:data:`_TORCH_NAMES`); raises on a name
    the class does not take, saying which it does."""
    if not kwargs:
        return kwargs
    out = {}
    for key, value in kwargs.items():
        if key in _TORCH_NAMES:
            mine = _TORCH_NAMES[key] or cls._hidden
            if key == "batch_first":
                if not isinstance(value, bool):
                    raise TypeError(f"batch_first must be a bool, got {value!r}")
                value = "batch_first" if value else "notebook"
            if mine in kwargs or mine in out:
                raise TypeError(f"{cls.__name__}() got both {key!r} and {mine!r}, which name "
                                f"the same argument; pass {mine!r} only")
            out[mine] = value
        elif key in _TORCH_REFUSED and key not in _accepted(cls):
            raise TypeError(f"{cls.__name__}() has no argument {key!r}: "
                            f"{_TORCH_REFUSED[key]}")
        else:
            out[key] = value
    unknown = [k for k in out if k not in _accepted(cls)]
    if unknown:
        raise TypeError(
            f"{cls.__name__}() got an unexpected keyword argument {unknown[0]!r}; its "
            f"arguments are {', '.join(_accepted(cls))} (torch's input_size, hidden_size "
            f"and batch_first are accepted too)")
    return out


class _Model(metaclass=_ModelType):
    """The stack: the one driver of layers x directions x lengths x dropout for every model
    class. A subclass gives its layer (:meth:`_make_layer`)."""

    #: The layer of every (layer, direction), which the class makes (``_make_layer``).
    layer: Layer
    #: The torch module class of the same model, by name in ``torch.nn`` (None: none).
    torch_name: str | None
    #: The parameters: one dict of arrays per (layer, direction), indexed ``layer D +
    #: direction``.
    params: list[dict[str, Array]]
    n_x: int
    #: The hidden size (``n_a`` for the LSTM, GRU and RNN, ``n_h`` for the xLSTM models).
    n_h: int
    num_layers: int
    bidirectional: bool
    dropout: float
    layout: str
    #: The namespace, dtype and device of the parameters.
    xp: Any
    dtype: Any
    device: Any

    def __init__(
        self, n_x: int, n_a: int, *, num_layers: int = 1, bidirectional: bool = False,
        dropout: float = 0.0, layout: str = "notebook", xp: Any = None, dtype: Any = None,
        device: Any = None, seed: int | np.random.Generator | None = 0,
    ) -> None:
        self.n_x = positive_int("n_x", n_x)
        self.n_h = positive_int(self._hidden, n_a)
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
        # float32 unless asked, as torch, Keras and Flax (the notebook's functions keep
        # the notebook's float64)
        self.dtype = resolve_dtype(self.xp, "float32" if dtype is None else dtype,
                                   device=device)
        self.device = device
        self.layer = self._make_layer()
        self.params = self._init_params(np.random.default_rng(seed_value("seed", seed,
                                                                     generator=True)))

    # ------------------------------------------------------------------ parameters
    @property
    def n_a(self) -> int:
        """The hidden size ``n_h`` by the notebook's name (``n_a``)."""
        return self.n_h

    @property
    def _time_major(self) -> tuple[int, int, int]:
        """The axes that take ``x`` or ``y`` from the model's layout to time-major ``(T, m,
        n)``, and back (each is its own inverse)."""
        return (1, 0, 2) if self.layout == "batch_first" else (2, 1, 0)

    @property
    def D(self) -> int:
        """Directions: 2 when bidirectional, else 1."""
        return 2 if self.bidirectional else 1

    def _config(self):
        return (type(self).__name__, self.layer.name, self.n_x, self.n_h, self.num_layers,
                self.D, self.layout, *self.layer.config())

    def _n_in(self, index):
        """Input features of (layer, direction) ``index``: ``n_x``, then ``D n_a``."""
        return self.n_x if index < self.D else self.D * self.layer.n_h

    def _make_layer(self) -> Layer:
        """The layer of every (layer, direction): by default the engine's, over the class's
        cell."""
        return CellLayer(self.cell, self.n_h)

    def param_shapes(self, index: int = 0) -> dict[str, tuple[int, ...]]:
        """The parameter dict of (layer, direction) ``index``: key to shape, in order."""
        return self.layer.param_shapes(self._n_in(index))

    def _init_params(self, rng):
        """Each (layer, direction)'s parameters as its layer draws them (on the host, so one
        seed gives the same numbers on every backend), in the model's namespace."""
        layers = [self.layer.init_params(rng, self._n_in(i))
                  for i in range(self.num_layers * self.D)]
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
            want = self.param_shapes(i)
            where = f"{name}[{i}]"
            if not isinstance(layer, Mapping):
                raise TypeError(f"{where} must be a dict of arrays, got {type(layer).__name__}")
            missing = [k for k in want if k not in layer]
            extra = [k for k in layer if k not in want]
            if missing or extra:
                raise KeyError(
                    f"{where} is not a {type(self).__name__} layer ({self.layer.name}): "
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
                        f"{self._hidden}={self.n_h}), got {tuple(got)}"
                    )
                arrays[f"{where}[{k!r}]"] = layer[k]
        return arrays

    def _state_arrays(self, state, name):
        """``state`` as a tuple of arrays (or None), checked for count and type."""
        if state is None:
            return None
        n = len(self.layer.state_names)
        if n == 1 and not isinstance(state, (tuple, list)):
            state = (state,)
        if not isinstance(state, (tuple, list)) or len(state) != n:
            names = [k.lower() for k in self.layer.state_names]
            what = f"({', '.join(names)}{',' if n == 1 else ''})"
            raise TypeError(f"{name} must be the tuple {what} of {type(self).__name__}, got "
                            f"{type(state).__name__}"
                            + (f" of length {len(state)}" if isinstance(state, (tuple, list))
                               else ""))
        return tuple(state)

    def _state_shapes(self, m):
        """The shape of each state array for a batch of ``m``."""
        return tuple((self.num_layers * self.D, *s) for s in self.layer.state_shapes(m))

    def _state_axes(self):
        """The axes after ``num_layers * D`` of each state array, for error messages."""
        return self.layer.state_axes

    def _check_state_shapes(self, arrays, name, m):
        """Raise unless every array has its state shape (``dstate`` may hold ``None``:
        no gradient on that part)."""
        for k, s, want, axes in zip(self.layer.state_names, arrays, self._state_shapes(m),
                                    self._state_axes()):
            if s is None and name == "dstate":
                continue
            if s is None or s.ndim != len(want) or tuple(s.shape) != want:
                got = None if s is None else tuple(s.shape)
                raise ValueError(
                    f"{name} {k.lower()} must have shape (num_layers * D, {axes}) = {want}, "
                    f"got {got}"
                )

    def initial_state(self, m: int) -> tuple[Array, ...]:
        """The zero state for a batch of ``m``: each array ``(num_layers * D, ..., m)``, in
        the model's namespace, dtype and device (an empty memory for the sLSTM and mLSTM).

        Examples
        --------
        >>> import xlstm
        >>> a, c = xlstm.LSTM(3, 4, num_layers=2).initial_state(5)
        >>> a.shape, c.dtype
        ((2, 4, 5), dtype('float32'))
        """
        m = positive_int("m", m)
        xp = self.xp
        with device_scope(xp=xp, device=self.device):
            return tuple(xp.zeros(shape, dtype=self.dtype, device=self.device)
                         for shape in self._state_shapes(m))

    def num_parameters(self) -> int:
        """The number of parameters (scalars) of every layer and direction.

        Examples
        --------
        >>> import xlstm
        >>> xlstm.RNN(3, 4).num_parameters()  # Wax (4, 3), Waa (4, 4), ba and bha (4, 1)
        36
        """
        return sum(math.prod(v.shape) for layer in self.params for v in layer.values())

    # ------------------------------------------------------------------ running
    @overload
    def forward(
        self, x: Array, state: Any = None, *, lengths: Array | None = None,
        params: Sequence[Mapping[str, Array]] | None = None, train: bool = False,
        seed: int | None = None,
        return_cache: Literal[True] = True,
    ) -> tuple[Array, tuple[Array, ...], ModelCache]: ...

    @overload
    def forward(
        self, x: Array, state: Any = None, *, lengths: Array | None = None,
        params: Sequence[Mapping[str, Array]] | None = None, train: bool = False,
        seed: int | None = None,
        return_cache: Literal[False],
    ) -> tuple[Array, tuple[Array, ...], None]: ...

    @overload
    def forward(
        self, x: Array, state: Any = None, *, lengths: Array | None = None,
        params: Sequence[Mapping[str, Array]] | None = None, train: bool = False,
        seed: int | None = None,
        return_cache: bool,
    ) -> tuple[Array, tuple[Array, ...], ModelCache | None]: ...

    def forward(
        self, x: Array, state: Any = None, *, lengths: Array | None = None,
        params: Sequence[Mapping[str, Array]] | None = None, train: bool = False,
        seed: int | None = None,
        return_cache: bool = True,
    ) -> tuple[Array, tuple[Array, ...], ModelCache | None]:
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

    def __call__(self, x: Array, state: Any = None, *,
                 lengths: Array | None = None) -> tuple[Array, tuple[Array, ...]]:
        """Inference: ``y, state = model(x, state)``, with no cache kept for a backward
        pass, so that the memory beyond the outputs does not grow with ``T``.

        The same as ``model.forward(x, state, lengths=lengths, return_cache=False)``
        without its ``None``; :meth:`forward` has the arguments.

        Examples
        --------
        >>> import numpy as np
        >>> import xlstm
        >>> model = xlstm.LSTM(3, 4)
        >>> y, (a, c) = model(np.ones((3, 2, 5), dtype=np.float32))  # (n_x, m, T)
        >>> y.shape, a.shape
        ((4, 2, 5), (1, 4, 2))
        """
        y, final, _ = self.forward(x, state, lengths=lengths, return_cache=False)
        return y, final

    @on_input_device
    def step(self, x_t: Array, state: Any = None) -> tuple[Array, tuple[Array, ...]]:
        """One time step of inference: ``y_t, state = model.step(x_t, state)``.

        Run over the steps of a sequence, it gives what :meth:`forward` gives for the
        whole sequence, to rounding (the mLSTM by its recurrent form). It does only what
        one step needs: the cells' fused weights are kept between calls (remade whenever
        ``model.params`` holds other arrays, or a torch tensor among them was written in
        place), and the input and state are checked for their shapes only. Write into the
        parameters' numpy or CuPy arrays in place, and the next step must be told:
        rebind them (``model.params = [dict(p) for p in model.params]``).

        Parameters
        ----------
        x_t : array, shape (n_x, m), or (m, n_x) with ``layout="batch_first"``
            The step's input, in the model's namespace, dtype and device.
        state : tuple of arrays, optional
            The state before the step, in the layout of :meth:`initial_state` (the state
            that :meth:`forward` and :meth:`step` return); default zeros.

        Returns
        -------
        y_t : array, shape (n_a, m), or (m, n_a) with ``layout="batch_first"``
            The last layer's output.
        state : tuple of arrays
            The state after the step.

        Raises
        ------
        ValueError
            For a bidirectional model (its reverse direction needs the whole sequence:
            call the model on it), or an input or state of the wrong shape.

        Examples
        --------
        >>> import numpy as np
        >>> import xlstm
        >>> model = xlstm.GRU(3, 4, num_layers=2)
        >>> x = np.random.default_rng(0).standard_normal((3, 2, 6)).astype(np.float32)
        >>> state = model.initial_state(2)
        >>> ys = []
        >>> for t in range(6):
        ...     y_t, state = model.step(x[:, :, t], state)
        ...     ys.append(y_t)
        >>> y, final = model(x)
        >>> bool(np.allclose(np.stack(ys, axis=-1), y, atol=1e-6))
        True
        """
        if self.bidirectional:
            raise ValueError(
                f"step runs one direction: a bidirectional {type(self).__name__}'s reverse "
                "direction needs the whole sequence; call the model on it, model(x)")
        xp = self.xp
        first = self.layout == "batch_first"
        shape = getattr(x_t, "shape", None)
        if shape is None or len(shape) != 2 or shape[1 if first else 0] != self.n_x:
            want = "(m, n_x)" if first else "(n_x, m)"
            got = None if shape is None else tuple(shape)
            raise ValueError(f"x_t must have shape {want} with n_x={self.n_x} "
                             f"(layout={self.layout!r}), got {got}")
        m = shape[0 if first else 1]
        if state is None:
            state = self.initial_state(m)
        else:
            state = self._state_arrays(state, "state")
            self._check_state_shapes(state, "state", m)
        prepared = self._step_weights()
        h = x_t if first else xp.permute_dims(x_t, (1, 0))
        news = []
        for i in range(self.num_layers):
            h, new = self.layer.step(h, tuple([_batch_first(s[i, ...], xp) for s in state]),
                                     prepared[i], xp=xp)
            news.append(new)
        if self.num_layers == 1:
            final = tuple([xp.expand_dims(_batch_last(s, xp), axis=0) for s in news[0]])
        else:
            final = tuple([xp.stack([_batch_last(new[k], xp) for new in news])
                           for k in range(len(news[0]))])
        return (h if first else xp.permute_dims(h, (1, 0))), final

    def _step_weights(self) -> list:
        """Each layer's weights as :meth:`step` reads them (``layer.prepare``), made once
        for the arrays that ``params`` holds: remade when one of them is another array,
        or a torch tensor's version counter moved (an in-place write)."""
        leaves = [v for layer in self.params for v in layer.values()]
        versions = [getattr(v, "_version", None) for v in leaves]
        kept = self.__dict__.get("_prepared")
        if kept is None or kept[1] != versions or len(kept[0]) != len(leaves) \
                or any(a is not b for a, b in zip(kept[0], leaves)):
            prepared = [self.layer.prepare(p, xp=self.xp) for p in self.params]
            kept = self._prepared = (leaves, versions, prepared)
        return kept[2]

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
        x = xp.permute_dims(x, self._time_major)  # (T, m, n_x) from here to the edge
        T, m = x.shape[0], x.shape[1]
        if state is not None:
            self._check_state_shapes(state, "state", m)
        pad = None if lengths is None else self._padding(lengths, m, T, xp)
        active, order = (None, None) if pad is None else pad
        keep = bool(return_cache)
        layer_of, D = self.layer, self.D
        masks = self._masks(seed, m, T, xp, x) if drop else (None,) * (self.num_layers - 1)
        # Padding is never read: whatever x holds past a length (NaN, inf), every layer sees
        # zeros there, so that its products (X^T dG, the mLSTM's q k^T) stay finite.
        x = _zero_outside(x, active, xp)
        kept, finals = [], []
        inp = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                i = layer * D + d
                state0 = (None,) * len(layer_of.state_names) if state is None else \
                    tuple(_batch_first(s[i, ...], xp) for s in state)
                y_d, fin, st = layer_of.forward(
                    _reverse(inp, order, xp) if d else inp, state0, params[i], xp=xp,
                    keep=keep, active=active, opts=opts)
                y_d = _zero_outside(y_d, active, xp)  # zero past each sequence's end
                outs.append(_reverse(y_d, order, xp) if d else y_d)
                finals.append(fin)
                kept.append(st)
            inp = outs[0] if D == 1 else xp.concat(outs, axis=-1)
            if layer < self.num_layers - 1 and masks[layer] is not None:
                inp = inp * masks[layer]
        y = inp
        final = tuple(copy(xp.stack([_batch_last(f[k], xp) for f in finals]))
                      for k in range(len(layer_of.state_names)))
        y = xp.permute_dims(y, self._time_major)  # the model's layout again
        if not keep:
            return y, final, None
        return copy(y), final, ModelCache(layer_of, self._config(), m, tuple(kept), tuple(masks),
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
        p = next(iter(arrays.values()))
        mine, theirs = namespace_or_none(p), namespace_or_none(x)
        if mine is None or theirs is None:
            return None
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
        sequence ``b`` is within its length; ``order (T m,)``, the gather of time-major rows
        that reverses each sequence within its length (an involution; padding stays in
        place)."""
        if not xp.isdtype(lengths.dtype, "integral"):
            raise TypeError(f"lengths must have an integer dtype, got {lengths.dtype}")
        if tuple(lengths.shape) != (m,):
            raise ValueError(f"lengths must have shape (m,) = ({m},), got {tuple(lengths.shape)}")
        if is_concrete(lengths):  # under jax.jit the values cannot be read, nor checked
            host = to_host(lengths)  # on the host: a concrete array closed over by a
            lo, hi = int(host.min()), int(host.max())  # jitted function is read there
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
        # row t m + b of a time-major (T m, n) array takes row t' m + b, t' = L_b - 1 - t
        src = xp.where(tt < L, L - 1 - tt, tt) * m + xp.arange(m, dtype=wide, device=dev)[:, None]
        return active, xp.reshape(xp.permute_dims(src, (1, 0)), (T * m,))

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
        """The dropout masks after each layer but the last, ``(T, m, D n_h)`` each: kept
        with probability ``1 - dropout`` and scaled by ``1 / (1 - dropout)`` (torch's
        inverted dropout), drawn on the host from ``seed``."""
        rng = np.random.default_rng(seed)
        keep = 1.0 - self.dropout
        masks = []
        for _ in range(self.num_layers - 1):
            # drawn as (D n_h, m, T), the layout of earlier versions: one seed, the same masks
            host = np.ascontiguousarray(
                ((rng.random((self.D * self.layer.n_h, m, T)) < keep) / keep).transpose(2, 1, 0))
            with device_scope(xp=xp, device=self.device):
                masks.append(xp.asarray(host, dtype=like.dtype, device=device_of(like)))
        return tuple(masks)

    @on_input_device
    def backward(
        self, dy: Array, cache: ModelCache, dstate: Any = None
    ) -> tuple[Array, tuple[Array, ...], list[dict[str, Array]]]:
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
        if cache.config != mine:
            raise ValueError(
                f"cache comes from another model ({cache.config[0]} with a {cache.config[1]} "
                f"layer, n_x={cache.config[2]}, {self._hidden}={cache.config[3]}); this is a "
                f"{mine[0]} with n_x={self.n_x}, {self._hidden}={self.n_h}"
            )
        self._check_cache(cache)
        dstate = self._state_arrays(dstate, "dstate")
        named = {"dy": dy}
        if dstate is not None:
            named.update((f"dstate[{i}]", s) for i, s in enumerate(dstate) if s is not None)
        xp = namespace(**named, **{"cache": cache.states[0].X})
        m, D, n_h = cache.m, self.D, self.layer.n_h  # the output's features
        T = cache.states[0].X.shape[0] // m
        first = self.layout == "batch_first"
        want = (m, T, D * n_h) if first else (D * n_h, m, T)
        if tuple(dy.shape) != want:
            h = self._hidden
            what = f"(m, T, D * {h})" if first else f"(D * {h}, m, T)"
            raise ValueError(f"dy must have the shape of y, {what} = {want}, got "
                             f"{tuple(dy.shape)}")
        dy = xp.permute_dims(dy, self._time_major)  # (T, m, D n_h)
        if dstate is not None:
            self._check_state_shapes(dstate, "dstate", m)
        grads: list[Any] = [None] * (self.num_layers * D)
        d0: list[Any] = [None] * (self.num_layers * D)
        active, order = (None, None) if cache.pad is None else cache.pad
        # the output is zero past each length, whatever dy holds there (torch's packed
        # output has no such positions): no layer reads it
        dy = _zero_outside(dy, active, xp)
        d_out = dy
        for layer in range(self.num_layers - 1, -1, -1):
            if layer < self.num_layers - 1 and cache.masks[layer] is not None:
                d_out = d_out * cache.masks[layer]  # through the dropout after this layer
            d_in = None
            for d in range(D):
                i = layer * D + d
                dy_d = d_out[..., d * n_h : (d + 1) * n_h]
                given = None if dstate is None else \
                    tuple(None if s is None else _batch_first(s[i, ...], xp) for s in dstate)
                dy_d = _reverse(dy_d, order, xp) if d else dy_d
                dx_d, d0[i], grads[i] = self.layer.backward(dy_d, cache.states[i], given,
                                                            xp=xp, active=active)
                dx_d = _reverse(dx_d, order, xp) if d else dx_d
                d_in = dx_d if d_in is None else d_in + dx_d
            d_out = d_in
        dx = xp.permute_dims(d_out, self._time_major)
        dstate0 = tuple(xp.stack([_batch_last(d[k], xp) for d in d0]) for k in range(len(d0[0])))
        return dx, dstate0, grads

    # ------------------------------------------------------------------ configuration
    #: The name of the hidden size among the constructor's arguments.
    _hidden = "n_a"

    def _extra_config(self) -> dict:
        """The constructor's arguments of the class beyond the stack's."""
        return {}

    def config(self) -> dict[str, Any]:
        """The constructor's arguments, JSON-able: ``type(model).from_config(model.config())``
        builds a model of the same configuration (its parameters drawn afresh from
        ``seed``; save the parameters to keep them).

        The namespace and dtype are given by name (``"xp": "numpy"``, ``"dtype":
        "float32"``); the device is not part of it.

        Examples
        --------
        >>> import xlstm
        >>> cfg = xlstm.GRU(3, 4, num_layers=2).config()
        >>> cfg["n_a"], cfg["num_layers"], cfg["xp"], cfg["dtype"]
        (4, 2, 'numpy', 'float32')
        >>> xlstm.GRU.from_config(cfg).config() == cfg
        True
        """
        first = next(iter(self.params[0].values()))
        return {"n_x": self.n_x, self._hidden: self.n_h, **self._extra_config(),
                "num_layers": self.num_layers, "bidirectional": self.bidirectional,
                "dropout": self.dropout, "layout": self.layout, "xp": _module_name(first),
                "dtype": _dtype_name(self.dtype)}

    @classmethod
    def from_config(cls: type[_M], config: Mapping[str, Any], *, xp: Any = None,
                    device: Any = None, seed: int | np.random.Generator | None = 0) -> _M:
        """A model built from ``config`` (:meth:`config`), with fresh parameters.

        Parameters
        ----------
        config : dict
            The constructor's arguments, the namespace and dtype by name.
        xp : namespace, optional
            Overrides ``config["xp"]`` (default: the module it names, imported).
        device : optional
            The parameters' device.
        seed : int or numpy.random.Generator, optional
            Seed of the initial parameters.
        """
        import importlib

        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict (model.config()), got {type(config).__name__}")
        kwargs = dict(config)
        name = kwargs.pop("xp", None)
        if xp is None and name is not None:
            if not isinstance(name, str):
                raise TypeError(f"config['xp'] must be a module's name, got {name!r}")
            xp = importlib.import_module(name)
        return cls(**kwargs, xp=xp, device=device, seed=seed)

    # ------------------------------------------------------------------ torch
    @classmethod
    def from_torch(cls: type[_M], module: Any, *, xp: Any = None, dtype: Any = None,
                   device: Any = None) -> _M:
        """A model with the weights of a ``torch.nn`` module of the same kind.

        Parameters
        ----------
        module : torch.nn.LSTM, torch.nn.GRU or torch.nn.RNN
            The module of this class's kind (an LSTM's ``proj_size`` is carried over).
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
        from .interop import model_from_torch

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
        from .interop import model_to_torch

        return model_to_torch(self)

    # ------------------------------------------------------------------ conversion, copies
    def to(self: _M, xp: Any = None, *, dtype: Any = None, device: Any = None) -> _M:
        """A copy of the model with its parameters in another namespace, dtype or device.

        Parameters
        ----------
        xp : namespace, optional
            The target namespace (``numpy``, ``torch``, ``cupy``, ``jax.numpy``,
            ``array_api_strict``); default the model's.
        dtype : dtype or str, optional
            A real floating dtype of the target namespace, or its name; default the
            model's (by name, in another namespace).
        device : optional
            The target device; default the model's in its own namespace, else the target
            namespace's default.

        Returns
        -------
        model
            A new model of the same class and configuration. Its parameters are copies:
            the two models share no memory.

        Examples
        --------
        >>> import xlstm
        >>> model = xlstm.LSTM(3, 4)
        >>> model.to(dtype="float64")
        LSTM(n_x=3, n_a=4, dtype='float64', xp='numpy')
        """
        target = self.xp if xp is None else namespace_of_module(xp)
        same = target is self.xp
        if dtype is None:
            dtype = self.dtype if same else _dtype_name(self.dtype)
        dtype = resolve_dtype(target, dtype, device=device)
        if device is None and same:
            device = self.device
        with device_scope(xp=target, device=device):
            params = [{k: target.asarray(v if same else to_host(v), dtype=dtype,
                                         device=device, copy=True)
                       for k, v in layer.items()} for layer in self.params]
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.pop("_prepared", None)
        new.xp, new.dtype, new.device, new.params = target, dtype, device, params
        return new

    def __getstate__(self) -> dict:
        """What pickle and :func:`copy.deepcopy` keep: the namespace and dtype by name
        (modules do not pickle), the device as that of the parameters, and the
        parameters as their namespace pickles them."""
        state = dict(self.__dict__)
        state.pop("_prepared", None)  # the step's weights are made again when needed
        state["xp"] = _module_name(next(iter(self.params[0].values())))
        state["dtype"] = _dtype_name(self.dtype)
        state["device"] = self.device is not None
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        xp = namespace_of_module(importlib.import_module(state["xp"]))
        state["xp"] = xp
        state["dtype"] = resolve_dtype(xp, state["dtype"])
        first = next(iter(state["params"][0].values()))
        state["device"] = device_of(first) if state["device"] else None
        self.__dict__.update(state)

    def _defaults(self) -> dict:
        """The constructor's default arguments, by name."""
        out: dict = {}
        for klass in reversed(type(self).__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.default is not p.empty:
                    out[p.name] = p.default
        return out

    def __repr__(self):
        """Every constructor argument that differs from its default, with the dtype and
        the namespace (and the device, where one was given)."""
        config = self.config()
        defaults = self._defaults()
        parts = [f"n_x={self.n_x}", f"{self._hidden}={self.n_h}"]
        for k, v in config.items():
            if k in ("n_x", self._hidden, "xp", "dtype"):
                continue
            if k in defaults and defaults[k] == v and type(defaults[k]) is type(v):
                continue
            parts.append(f"{k}={v!r}")
        parts += [f"dtype={config['dtype']!r}", f"xp={config['xp']!r}"]
        if self.device is not None:
            parts.append(f"device={self.device!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


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


def _zero_outside(a, active, xp):
    """``a (T, m, n)`` with zeros where ``active (T, m, 1)`` is false (past each sequence's
    length); ``a`` itself when ``active`` is ``None`` (no padding). A new array: the
    caller's is not written."""
    if active is None:
        return a
    return xp.where(active, a, xp.zeros((), dtype=a.dtype, device=device_of(a)))


def _batch_first(s, xp):
    """A state array of the model's layout, batch last, with the batch first (a view)."""
    return xp.permute_dims(s, (s.ndim - 1, *range(s.ndim - 1)))


def _batch_last(s, xp):
    """The inverse of :func:`_batch_first`."""
    return xp.permute_dims(s, (*range(1, s.ndim), 0))


def _reverse(a, order, xp):
    """``a (T, m, n)`` with its time axis reversed: whole (``order`` ``None``), or within
    each sequence's length by the gather ``order`` (:meth:`_Model._padding`)."""
    if order is None:
        return xp.flip(a, axis=0)
    T, m, n = a.shape
    return xp.reshape(xp.take(xp.reshape(a, (T * m, n)), order, axis=0), (T, m, n))
