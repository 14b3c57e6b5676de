"""xlstm.save / xlstm.load: whole-model safetensors files (class, config, parameters), their
round trips on every model and backend, interchange with the safetensors package, and the
refusal of damaged and crafted files."""

from __future__ import annotations

import io
import json
import os
import pathlib
import stat

import numpy as np
import pytest
from helpers import assert_close, time_limit, to_numpy

import xlstm
from xlstm.io import safetensors
from xlstm.models import MODELS

N_X, N_H, M, T = 3, 4, 2, 5


def make(name, *, num_layers=1, bidirectional=False, layout="notebook", dtype="float64",
         seed=5, **extra):
    cls, kwargs = MODELS[name]
    return cls(N_X, N_H, num_layers=num_layers, bidirectional=bidirectional, layout=layout,
               dtype=dtype, seed=seed, **kwargs, **extra)


def inputs(model, dtype="float64"):
    shape = (N_X, M, T) if model.layout == "notebook" else (M, T, N_X)
    return np.random.default_rng(1).standard_normal(shape).astype(dtype)


def file_bytes(model):
    buf = io.BytesIO()
    xlstm.save(buf, model)
    return buf.getvalue()


def split(raw):
    """``(header dict, data bytes)`` of a safetensors file's bytes."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header, data):
    """A safetensors file's bytes from a header dict (written as given) and data bytes."""
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def load_bytes(raw, tmp_path, name="m.safetensors", **kwargs):
    path = tmp_path / name
    path.write_bytes(raw)
    return xlstm.load(path, **kwargs)


def same_params(got, want):
    """Bit for bit: same structure, keys, dtypes and values (NaN-free parameters)."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert list(a) == list(b)
        for k in a:
            ga, wb = to_numpy(a[k]), to_numpy(b[k])
            assert ga.dtype == wb.dtype and ga.shape == wb.shape, k
            assert np.array_equal(ga, wb), k


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["notebook", "batch_first"])
@pytest.mark.parametrize("num_layers, bidirectional", [(1, False), (2, True)],
                         ids=["1-layer", "2-layers-bidirectional"])
@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_of_every_model(tmp_path, name, num_layers, bidirectional, layout, dtype):
    model = make(name, num_layers=num_layers, bidirectional=bidirectional, layout=layout,
                 dtype=dtype)
    path = tmp_path / f"{name}.safetensors"
    xlstm.save(path, model)
    back = xlstm.load(path)
    assert type(back) is type(model)
    assert back.config() == model.config()
    same_params(back.params, model.params)
    # the parameters are the file's, not the fresh ones from_config draws
    fresh = type(model).from_config(model.config())
    assert not all(np.array_equal(a[k], b[k]) for a, b in zip(fresh.params, back.params)
                   for k in a)
    x = inputs(model, dtype)
    y, state, _ = model.forward(x)
    y2, state2, _ = back.forward(x)
    assert np.array_equal(y2, y)
    assert all(np.array_equal(s2, s) for s2, s in zip(state2, state))
    # nothing is left behind but the file
    assert os.listdir(tmp_path) == [path.name]


def test_file_is_plain_safetensors_with_named_tensors_and_metadata():
    model = make("lstm", num_layers=2, bidirectional=True, dtype="float32")
    header, data = split(file_bytes(model))
    meta = header.pop("__metadata__")
    assert meta["format"] == "xlstm-model" and meta["version"] == "1"
    assert meta["class"] == "LSTM"
    assert json.loads(meta["config"]) == model.config()
    names = [f"{i}.{k}" for i, layer in enumerate(model.params) for k in layer]
    assert list(header) == names  # in the order of model.params
    at = 0
    for i, layer in enumerate(model.params):
        for k, a in layer.items():
            entry = header[f"{i}.{k}"]
            assert entry["dtype"] == "F32" and entry["shape"] == list(a.shape)
            begin, end = entry["data_offsets"]
            assert begin == at
            np.testing.assert_array_equal(np.frombuffer(data[begin:end], "<f4").reshape(a.shape),
                                          a)
            at = end
    assert at == len(data)


def test_file_objects_work():
    model = make("gru", dtype="float64")
    buf = io.BytesIO()
    xlstm.save(buf, model)
    buf.seek(0)
    same_params(xlstm.load(buf).params, model.params)


def test_load_into_every_backend(xp, device, tmp_path):
    for dtype in ("float32", "float64"):
        model = make("lstm", num_layers=2, bidirectional=True, dtype=dtype)
        xlstm.save(tmp_path / "m.safetensors", model)
        back = xlstm.load(tmp_path / "m.safetensors", xp=xp, device=device)
        assert type(back) is xlstm.LSTM
        for a, b in zip(back.params, model.params):
            for k in b:
                assert_close(a[k], b[k], xp=xp, device=device, dtype=getattr(xp, dtype),
                             rtol=0, atol=0)
        x = inputs(model, dtype)
        y, _, _ = back.forward(xp.asarray(x, device=device))
        assert_close(y, model.forward(x)[0], xp=xp, device=device, dtype=getattr(xp, dtype),
                     rtol=1e-6 if dtype == "float32" else 1e-12, atol=1e-7)


def test_cross_backend_numpy_and_torch(tmp_path):
    torch = pytest.importorskip("torch")
    model = make("slstm", num_layers=2, dtype="float64")
    xlstm.save(tmp_path / "np.safetensors", model)
    on_torch = xlstm.load(tmp_path / "np.safetensors", xp=torch)
    assert isinstance(on_torch.params[0]["W"], torch.Tensor)
    assert on_torch.params[0]["W"].dtype == torch.float64
    same_params(on_torch.params, model.params)
    # saved from torch: loads into torch by default, into numpy when asked
    xlstm.save(tmp_path / "torch.safetensors", on_torch)
    again = xlstm.load(tmp_path / "torch.safetensors")
    assert isinstance(again.params[0]["W"], torch.Tensor)
    plain = xlstm.load(tmp_path / "torch.safetensors", xp=np)
    assert isinstance(plain.params[0]["W"], np.ndarray)
    same_params(plain.params, model.params)


def test_half_precision_tensors_load_widened_into_a_float32_model(tmp_path):
    model = make("rnn_tanh", dtype="float32")
    header, _ = split(file_bytes(model))
    # values that float16 and bfloat16 hold exactly
    rng = np.random.default_rng(0)
    values = {k: (rng.integers(-64, 64, size=a.shape) / 32.0).astype(np.float32)
              for k, a in model.params[0].items()}
    f16 = {f"0.{k}": v.astype(np.float16) for k, v in values.items()}
    buf = io.BytesIO()
    safetensors.write(buf, f16, header["__metadata__"])
    back = load_bytes(buf.getvalue(), tmp_path)
    for k, v in values.items():
        assert back.params[0][k].dtype == np.float32
        np.testing.assert_array_equal(back.params[0][k], v)
    # bfloat16: the upper 16 bits of each float32
    bf16, data, at = {"__metadata__": header["__metadata__"]}, b"", 0
    for k, v in values.items():
        raw = (v.view(np.uint32) >> 16).astype("<u2").tobytes()
        bf16[f"0.{k}"] = {"dtype": "BF16", "shape": list(v.shape),
                          "data_offsets": [at, at + len(raw)]}
        data, at = data + raw, at + len(raw)
    back = load_bytes(join(bf16, data), tmp_path, "bf16.safetensors")
    for k, v in values.items():
        np.testing.assert_array_equal(back.params[0][k], v)


# -------------------------------------------------------------------- the safetensors package
def test_our_file_loads_in_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors")
    from safetensors.numpy import load_file

    model = make("mlstm", num_layers=2, bidirectional=True, dtype="float32")
    path = tmp_path / "m.safetensors"
    xlstm.save(path, model)
    tensors = load_file(path)
    assert set(tensors) == {f"{i}.{k}" for i, layer in enumerate(model.params) for k in layer}
    for i, layer in enumerate(model.params):
        for k, a in layer.items():
            np.testing.assert_array_equal(tensors[f"{i}.{k}"], a)
            assert tensors[f"{i}.{k}"].dtype == np.float32
    with st.safe_open(path, framework="np") as f:
        meta = f.metadata()
    assert meta["class"] == "MLSTM" and json.loads(meta["config"]) == model.config()


def test_a_file_of_the_safetensors_package_loads(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.numpy import save_file

    model = make("gru", num_layers=2, dtype="float64")
    header, _ = split(file_bytes(model))
    tensors = {f"{i}.{k}": a for i, layer in enumerate(model.params) for k, a in layer.items()}
    path = tmp_path / "theirs.safetensors"
    save_file(tensors, path, metadata=header["__metadata__"])  # its own order and padding
    back = xlstm.load(path)
    assert type(back) is xlstm.GRU and back.config() == model.config()
    same_params(back.params, model.params)


# ------------------------------------------------------------------------- damaged files
def test_truncated_files_are_refused(tmp_path):
    raw = file_bytes(make("lstm"))
    n = int.from_bytes(raw[:8], "little")
    for cut, match in [(0, "too short"), (5, "too short"), (8 + n // 2, "truncated"),
                       (8 + n, "truncated"), (len(raw) - 1, "truncated")]:
        with pytest.raises(ValueError, match=rf"'.*cut\.safetensors'.*{match}"):
            load_bytes(raw[:cut], tmp_path, "cut.safetensors")


def test_a_header_over_the_cap_is_refused_before_it_is_read(tmp_path):
    raw = (1 << 40).to_bytes(8, "little") + b"{}"
    with pytest.raises(ValueError, match=r"big\.safetensors.*header of 1099511627776 bytes, "
                                         r"over the 4194304"):
        load_bytes(raw, tmp_path, "big.safetensors")
    # an .npz (a zip) is not mistaken for one
    xlstm.save_params(tmp_path / "p.npz", make("lstm").params)
    with pytest.raises(ValueError, match=r"p\.npz.*not a\s+safetensors file"):
        xlstm.load(tmp_path / "p.npz")


def edited(model, edit):
    """The bytes of ``model``'s file with its header dict changed in place by
    ``edit(header)``."""
    header, data = split(file_bytes(model))
    edit(header)
    return join(header, data)


def set_offsets(name, offsets):
    def edit(h):
        h[name]["data_offsets"] = offsets
    return edit


@pytest.mark.parametrize("edit, match", [
    (set_offsets("0.bf", [0, 32]),
     r"tensor '0\.Wf' \(bytes 0 to 224\) overlaps tensor '0\.bf', which ends at 32"),
    (lambda h: h["0.Wf"].update(data_offsets=[h["0.Wf"]["data_offsets"][0] + 8,
                                              h["0.Wf"]["data_offsets"][1] + 8]),
     r"belong to no tensor|overlaps"),
    (lambda h: h["0.bho"].update(data_offsets=[h["0.bho"]["data_offsets"][0] + 8,
                                               h["0.bho"]["data_offsets"][1] + 8]),
     r"the bytes \d+ to \d+ of the data belong to no tensor"),
    (lambda h: h["0.bho"].update(data_offsets=[10**15, 10**15 + 32]),
     r"belong to no tensor"),
    (set_offsets("0.bf", [-8, 24]), r"data_offsets \[-8, 24\]"),
    (set_offsets("0.bf", [40, 8]), r"data_offsets \[40, 8\]"),
    (lambda h: h["0.Wf"].update(shape=[4, 8]), r"'0\.Wf' of shape \(4, 8\) and dtype F64 takes "
                                                r"256 bytes, but its data_offsets .* span 224"),
    (lambda h: h["0.Wf"].update(dtype="I64"), r"tensor '0\.Wf' has dtype 'I64'; only \['F64', "
                                              r"'F32', 'F16', 'BF16'\] are read"),
    (lambda h: h["0.Wf"].update(dtype="F32"), r"'0\.Wf' of shape \(4, 7\) and dtype F32 takes"),
    (lambda h: h["0.Wf"].update(extra=1), r"'0\.Wf' must be an object with exactly the fields"),
    (lambda h: h["0.Wf"].update(shape=[4, 7.0]), r"'0\.Wf' has the shape \[4, 7\.0\]"),
    (lambda h: h.update(__metadata__={"format": 1}), r"__metadata__ must be an object of "
                                                     r"strings to strings"),
    (lambda h: h.pop("__metadata__"), r"has no __metadata__, so it is a safetensors file of "
                                      r"tensors alone"),
    (lambda h: h["__metadata__"].update(format="pt"), r"not an xlstm model file .*'pt'"),
    (lambda h: h["__metadata__"].update(version="2"), r"unknown model file version '2'"),
    (lambda h: h["__metadata__"].pop("config"), r"lacks the fields \['config'\]"),
    (lambda h: h["__metadata__"].update({"class": "os.system"}),
     r"unknown model class 'os\.system'; a model file holds one of \[.*'LSTM'"),
])
def test_crafted_headers_are_refused(tmp_path, edit, match):
    raw = edited(make("lstm"), edit)
    with pytest.raises(ValueError, match=r"'.*bad\.safetensors': .*" + match):
        load_bytes(raw, tmp_path, "bad.safetensors")


def test_trailing_bytes_and_bad_json_are_refused(tmp_path):
    raw = file_bytes(make("lstm"))
    with pytest.raises(ValueError, match=r"holds 3 bytes after its last tensor"):
        load_bytes(raw + b"abc", tmp_path)
    header, data = split(raw)
    text = json.dumps(header)
    dup = text[:-1] + ', "0.Wf": ' + json.dumps(header["0.Wf"]) + "}"
    for bad, match in [(dup, r"duplicate fields \['0\.Wf'\]"),
                       ('{"a": [[[[1]]]]}', r"nests 5 levels deep"),
                       ("[1, 2]", "not a JSON object"),
                       ('{"a": ', "not valid JSON"),
                       ("\ufeff{}", "not a JSON object")]:
        text_bytes = bad.encode()
        with pytest.raises(ValueError, match=match):
            load_bytes(len(text_bytes).to_bytes(8, "little") + text_bytes + data, tmp_path)
    bad = b"\xff\xfe{}"
    with pytest.raises(ValueError, match="not UTF-8"):
        load_bytes(len(bad).to_bytes(8, "little") + bad, tmp_path)


def with_config(model, **changes):
    def edit(h):
        config = json.loads(h["__metadata__"]["config"])
        config.update(changes)
        h["__metadata__"]["config"] = json.dumps(config)
    return edited(model, edit)


@pytest.mark.parametrize("changes, match", [
    ({"n_a": 5}, r"tensor '0\.Wf' has shape \(4, 7\), but the LSTM its config describes "
                 r"needs \(5, 8\)"),
    ({"num_layers": 2}, r"its tensors are not the parameters of the LSTM its config "
                        r"describes: missing \['1\.Wf'"),
    ({"bidirectional": True}, r"missing \['1\.Wf'"),
    ({"dtype": "float32"}, r"tensor '0\.Wf' is F64, but the config's dtype is 'float32' "
                           r"\(stored as F32 or F16 or BF16\)"),
    ({"dtype": "int64"}, r"config's 'dtype' is 'int64'"),
    ({"xp": "os"}, r"config's namespace 'xp' is 'os'; a model file names one of"),
    ({"seed": 1}, r"config has the fields \['seed'\]"),
    ({"n_a": -1}, r"config does not make a LSTM"),
    ({"colour": "red"}, r"config does not make a LSTM \(TypeError: .*colour"),
    # sizes that would take petabytes: refused from the skeleton, before any allocation
    ({"n_a": 10**7}, r"needs \(10000000, 10000003\)"),
    ({"num_layers": 10**12}, r"describes 1000000000000 layers and directions, but the file "
                             r"holds 12 tensors"),
])
def test_config_that_does_not_match_the_tensors_is_refused(tmp_path, changes, match):
    raw = with_config(make("lstm"), **changes)
    with time_limit(20), pytest.raises(ValueError, match=r"'.*m\.safetensors': .*" + match):
        load_bytes(raw, tmp_path)


def test_config_that_is_not_a_small_json_object_is_refused(tmp_path):
    for text, match in [("[1]", "must be a JSON object"), ("{", "not valid JSON"),
                        ('{"a": [[[[[1]]]]]}', "nests 6 levels deep"),
                        ('{"n_a": 4, "n_a": 4}', r"duplicate fields \['n_a'\]")]:
        raw = edited(make("lstm"), lambda h, text=text: h["__metadata__"].update(config=text))
        with pytest.raises(ValueError, match=match):
            load_bytes(raw, tmp_path)


def test_wrong_rnn_variant_and_other_classes_are_refused(tmp_path):
    rnn = make("rnn_relu")
    raw = edited(rnn, lambda h: h["__metadata__"].update({"class": "GRU"}))
    with pytest.raises(ValueError, match=r"config does not make a GRU .*nonlinearity"):
        load_bytes(raw, tmp_path)
    raw = edited(make("gru"), lambda h: h["__metadata__"].update({"class": "LSTM"}))
    with pytest.raises(ValueError, match=r"not the parameters of the LSTM .*missing "
                                         r"\['0\.Wf', .*; unexpected \['0\.Wr', "):
        load_bytes(raw, tmp_path)


def test_parameters_over_the_size_limit_are_refused(tmp_path, monkeypatch):
    import xlstm.io

    model = make("gru")
    size = 8 * sum(a.size for layer in model.params for a in layer.values())
    xlstm.save(tmp_path / "m.safetensors", model)
    monkeypatch.setattr(xlstm.io, "MAX_LOAD_BYTES", size - 1)
    with pytest.raises(ValueError, match=rf"declares {size} bytes of arrays .*MAX_LOAD_BYTES"):
        xlstm.load(tmp_path / "m.safetensors")
    monkeypatch.setattr(xlstm.io, "MAX_LOAD_BYTES", size)
    same_params(xlstm.load(tmp_path / "m.safetensors").params, model.params)


def test_files_that_are_not_regular_are_refused(tmp_path):
    cases = {}
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.safetensors")
        cases[tmp_path / "fifo.safetensors"] = r"a FIFO \(named pipe\)"
    (tmp_path / "folder.safetensors").mkdir()
    cases[tmp_path / "folder.safetensors"] = "a directory"
    if os.path.exists("/dev/zero"):
        cases[pathlib.Path("/dev/zero")] = "a character device"
    for path, kind in cases.items():
        with time_limit(20), pytest.raises(ValueError, match=f"is {kind}; only regular"):
            xlstm.load(path)
    if os.path.exists("/dev/zero"):
        with open("/dev/zero", "rb") as f, pytest.raises(ValueError, match="character device"):
            xlstm.load(f)
    xlstm.save(tmp_path / "m.safetensors", make("lstm"))
    with open(tmp_path / "m.safetensors", encoding="latin-1") as f:
        with pytest.raises(TypeError, match=r"binary mode \('rb'\)"):
            xlstm.load(f)
    with pytest.raises(FileNotFoundError):
        xlstm.load(tmp_path / "missing.safetensors")


def test_damaged_files_raise_only_clear_errors(tmp_path):
    good = file_bytes(make("slstm", num_layers=2))
    rng = np.random.default_rng(3)
    refused = 0
    for _ in range(300):
        bad = bytearray(good)
        for at in rng.integers(0, len(bad), size=rng.choice([1, 2, 8])):
            bad[at] = rng.integers(0, 256)
        try:
            xlstm.load(io.BytesIO(bytes(bad)))
        except ValueError:
            refused += 1
    assert refused > 0  # flips in the header are caught; flips in the data load as numbers


# ------------------------------------------------------------------------------- saving
def test_save_refuses_what_it_cannot_keep(tmp_path):
    class Mine(xlstm.LSTM):
        pass

    with pytest.raises(TypeError, match=r"model must be an instance of one of the model "
                                        r"classes \[.*'LSTM'.*\], got .*Mine"):
        xlstm.save(tmp_path / "m.safetensors", Mine(N_X, N_H))
    with pytest.raises(TypeError, match="model must be an instance"):
        xlstm.save(tmp_path / "m.safetensors", {"Wf": np.zeros((4, 7))})
    model = make("lstm")
    model.params = [dict(model.params[0], Wf=np.zeros((4, 6)))]
    with pytest.raises(ValueError, match=r"model\.params\[0\]\['Wf'\] must have shape \(4, 7\)"):
        xlstm.save(tmp_path / "m.safetensors", model)
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_save_replaces_a_file_keeping_its_mode(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    path.chmod(0o640)
    model = make("gru")
    xlstm.save(path, model)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    same_params(xlstm.load(path).params, model.params)
