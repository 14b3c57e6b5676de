"""Whole-model files: what :func:`xlstm.save` writes and :func:`xlstm.load` checks.

A model file is a safetensors file (:mod:`xlstm.io.safetensors`). Its ``__metadata__``
holds the format's name and version, the model's class (by name, one of the classes of
:data:`xlstm.models.MODELS`) and its configuration (``model.config()`` as JSON); its
tensors are the parameters, named by their place in ``model.params``: ``"0.Wf"``, ``"1.bhf"``
(the (layer, direction) index ``layer * D + direction``, then the key).

The metadata comes from an untrusted file, so nothing in it is run or imported beyond
a fixed list: the class must be one of the model classes, the namespace one of
:data:`NAMESPACES`, the dtype float32 or float64, and the configuration a small JSON
object. Before any parameter is made or read, the configuration builds the model's
skeleton (its checks run, but no parameter is drawn), whose parameter names and shapes the
file's tensors must match exactly: a configuration cannot make :func:`xlstm.load` allocate
more than the tensors the file holds.
"""

from __future__ import annotations

import json
from typing import Any

from .schema import _json_depth, _no_duplicate_fields, _short

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "NAMESPACES", "model_classes", "file_contents",
           "check_file", "build"]

#: The ``format`` field of a model file's metadata.
FORMAT_NAME = "xlstm-model"
#: The version of the format that :func:`xlstm.save` writes and :func:`xlstm.load` reads.
FORMAT_VERSION = 1
#: The namespaces a file may name (``config["xp"]``), by the module imported for them.
NAMESPACES = ("numpy", "torch", "jax.numpy", "cupy", "array_api_strict")

_FIELDS = ("format", "version", "class", "config")
_DTYPES = {"float32": ("F32", "F16", "BF16"), "float64": ("F64",)}
_NOT_CONFIG = ("seed", "device")  # from_config's own arguments
_MAX_CONFIG_DEPTH = 4


def model_classes() -> dict[str, type]:
    """The classes a model file may hold, by name: those of :data:`xlstm.models.MODELS`."""
    from ..models import MODELS

    return {cls.__name__: cls for cls, _ in MODELS.values()}


def file_contents(model: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors (numpy, by name) and the metadata of ``model``'s file.

    Raises
    ------
    TypeError
        If ``model`` is not an instance of one of :func:`model_classes` (a subclass is not:
        it would load as its base), its configuration is not JSON-able, or its parameters
        are not float32 or float64.
    ValueError
        If its parameters do not fit its configuration.
    """
    import numpy as np

    from .._lib.compat import namespace, to_host

    classes = model_classes()
    name = type(model).__name__
    if classes.get(name) is not type(model):
        raise TypeError(f"model must be an instance of one of the model classes "
                        f"{sorted(classes)}, got {type(model).__module__}.{name}")
    config = model.config()
    try:
        text = json.dumps(config, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"model.config() is not JSON-able ({exc}): {_short(config)}") from None
    namespace(**model._check_params(model.params, "model.params"))
    tensors = {}
    for i, layer in enumerate(model.params):
        for k, a in layer.items():
            tensors[f"{i}.{k}"] = np.ascontiguousarray(to_host(a))
    dtypes = {a.dtype.name for a in tensors.values()}
    if dtypes != {config["dtype"]} or config["dtype"] not in _DTYPES:
        raise TypeError(f"model.params are {sorted(dtypes)} and model.config() says "
                        f"{config['dtype']!r}; float32 and float64 models are saved")
    meta = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "class": name,
            "config": text}
    return tensors, meta


def check_file(header: Any, where: str) -> tuple[type, dict]:
    """The class and the configuration of the model file whose safetensors header is
    ``header``, after checking its tensors against them (no tensor data read).

    Raises
    ------
    ValueError
        If the metadata is missing or is not a model file's of a known version, names an
        unknown class, namespace or dtype, holds a configuration that is not a small JSON
        object or does not build the class, or the tensors' names, shapes or dtypes are not
        exactly those of the model it configures; the message starts with ``where``.
    """
    meta = header.metadata
    if meta is None:
        raise ValueError(f"{where}: has no __metadata__, so it is a safetensors file of tensors "
                         "alone, not a model file written by xlstm.save")
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{where}: not an xlstm model file (its metadata's format is "
                         f"{_short(meta.get('format'))}, expected {FORMAT_NAME!r})")
    if meta.get("version") != str(FORMAT_VERSION):
        raise ValueError(f"{where}: unknown model file version {_short(meta.get('version'))}; "
                         f"this xlstm reads version {FORMAT_VERSION} (a newer xlstm may have "
                         "written it)")
    missing = [k for k in _FIELDS if k not in meta]
    if missing:
        raise ValueError(f"{where}: its metadata lacks the fields {missing}")
    classes = model_classes()
    cls = classes.get(meta["class"])
    if cls is None:
        raise ValueError(f"{where}: unknown model class {_short(meta['class'])}; a model file "
                         f"holds one of {sorted(classes)}")
    config = _parse_config(meta["config"], cls, where)
    want = _param_shapes(cls, config, len(header.entries), where)
    names = list(header.entries)
    lacking = [k for k in want if k not in header.entries]
    extra = [k for k in names if k not in want]
    if lacking or extra:
        raise ValueError(
            f"{where}: its tensors are not the parameters of the {cls.__name__} its config "
            "describes: " + "; ".join(
                [f"missing {_short(lacking)}"] * bool(lacking)
                + [f"unexpected {_short(extra)}"] * bool(extra))
        )
    accepted = _DTYPES[config["dtype"]]
    for k, shape in want.items():
        e = header.entries[k]
        if e.shape != shape:
            raise ValueError(f"{where}: tensor {k!r} has shape {e.shape}, but the "
                             f"{cls.__name__} its config describes needs {shape}")
        if e.dtype not in accepted:
            raise ValueError(f"{where}: tensor {k!r} is {e.dtype}, but the config's dtype is "
                             f"{config['dtype']!r} (stored as {' or '.join(accepted)})")
    return cls, config


def _parse_config(text, cls, where):
    """The configuration's JSON text, parsed and its fixed fields checked."""
    depth = _json_depth(text)
    if depth > _MAX_CONFIG_DEPTH:
        raise ValueError(f"{where}: its config nests {depth} levels deep; at most "
                         f"{_MAX_CONFIG_DEPTH} are read")
    try:
        config = json.loads(text, object_pairs_hook=_no_duplicate_fields)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{where}: its config is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where}: its config must be a JSON object (model.config()), got "
                         f"{_short(config)}")
    own = [k for k in _NOT_CONFIG if k in config]
    if own:
        raise ValueError(f"{where}: its config has the fields {own}, which are load's or "
                         "from_config's arguments, not a model's configuration")
    if config.get("xp") not in NAMESPACES:
        raise ValueError(f"{where}: its config's namespace 'xp' is {_short(config.get('xp'))}; "
                         f"a model file names one of {list(NAMESPACES)}")
    if config.get("dtype") not in _DTYPES:
        raise ValueError(f"{where}: its config's 'dtype' is {_short(config.get('dtype'))}; "
                         f"a model file is {' or '.join(_DTYPES)}")
    return config


def _param_shapes(cls, config, n_tensors, where):
    """``{tensor name: shape}`` of the model ``config`` describes, from its skeleton: the
    class's constructor (and its checks) run in numpy with no parameter drawn."""
    import numpy as np

    skeleton = type(cls.__name__, (cls,), {"_init_params": lambda self, rng: []})
    try:
        model = skeleton.from_config(config, xp=np)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{where}: its config does not make a {cls.__name__} "
                         f"({type(exc).__name__}: {exc})") from None
    count = model.num_layers * model.D
    if count > n_tensors:
        raise ValueError(f"{where}: its config describes {count} layers and directions, but "
                         f"the file holds {n_tensors} tensors")
    return {f"{i}.{k}": tuple(shape) for i in range(count)
            for k, shape in model.param_shapes(i).items()}


def build(cls: type, config: dict, host: dict[str, Any], where: str, xp: Any,
          device: Any) -> Any:
    """The model of class ``cls`` and ``config`` in namespace ``xp`` (``None``: the
    config's, imported) on ``device``, with the parameters ``host`` (numpy, by tensor name,
    checked by :func:`check_file`)."""
    import importlib

    from .._lib.compat import device_of, device_scope, namespace

    if xp is None:
        try:
            xp = importlib.import_module(config["xp"])
        except ImportError as exc:
            raise ImportError(f"{where}: the model was saved from {config['xp']}, which "
                              f"cannot be imported here ({exc}); pass xp= (numpy, say) to "
                              "load it into another namespace") from None
    model = cls.from_config(config, xp=xp, device=device)
    first = next(iter(model.params[0].values()))
    target, dtype, on = namespace(p=first), first.dtype, device_of(first)
    params = []
    with device_scope(xp=target, device=on):
        for i, layer in enumerate(model.params):
            arrays = {}
            for k in layer:
                arr = target.asarray(host[f"{i}.{k}"], dtype=dtype, device=on)
                if arr.dtype != dtype:
                    raise TypeError(f"{where}: the target namespace turned tensor "
                                    f"'{i}.{k}' into {arr.dtype}, not {dtype}")
                arrays[k] = arr
            params.append(arrays)
    model._check_params(params)
    model.params = params
    return model
