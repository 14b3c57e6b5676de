"""save_params / load_params: round trips on every backend and refusal of bad files."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from helpers import assert_array, assert_close, to_numpy, to_xp

from xlstm.io import FORMAT_VERSION, load_params, save_params
from xlstm.params import PARAM_KEYS, init_params

N_X, N_A, N_Y = 3, 4, 2


def host_params():
    return init_params(N_X, N_A, N_Y, seed=7)


def write_npz(path, entries):
    """An .npz written directly with numpy, for crafting bad files."""
    with open(path, "wb") as f:
        np.savez(f, **entries)


def saved_entries(tmp_path):
    """The entries of a good file, as a dict of numpy arrays (meta included)."""
    path = tmp_path / "good.npz"
    save_params(path, host_params())
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def meta_bytes(**fields):
    meta = {"format": "xlstm-params", "version": 1, "n_x": N_X, "n_a": N_A, "n_y": N_Y}
    meta["dtype"] = "float64"
    meta.update(fields)
    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_round_trip_on_every_backend(xp, device, tmp_path, dtype_name):
    host = host_params()
    dtype = getattr(xp, dtype_name)
    params = to_xp(host, xp, device, dtype=dtype)
    path = tmp_path / "p.npz"
    save_params(path, params)
    back = load_params(path, xp=xp, device=device)
    assert list(back) == list(PARAM_KEYS)
    for k in PARAM_KEYS:
        want = to_numpy(params[k])
        assert_close(back[k], want, xp=xp, device=device, dtype=dtype, rtol=0, atol=0)
    # default target: numpy, saved dtype kept
    plain = load_params(path)
    for k in PARAM_KEYS:
        assert isinstance(plain[k], np.ndarray) and plain[k].dtype == np.dtype(dtype_name)
        np.testing.assert_array_equal(plain[k], to_numpy(params[k]))


def test_save_on_one_backend_load_on_another(xp, device, tmp_path):
    host = host_params()
    path = tmp_path / "from_numpy.npz"
    save_params(path, host)
    back = load_params(path, xp=xp, device=device)
    for k in PARAM_KEYS:
        assert_close(back[k], host[k], xp=xp, device=device, dtype=xp.float64, rtol=0, atol=0)
    # and the other way round: written on this backend, read back into numpy
    path2 = tmp_path / "to_numpy.npz"
    save_params(path2, back)
    again = load_params(path2)
    for k in PARAM_KEYS:
        np.testing.assert_array_equal(again[k], host[k])


def test_cross_backend_torch_and_strict(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import array_api_strict as strict

    host = host_params()
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in host.items()}
    save_params(tmp_path / "t.npz", tparams)
    dev = strict.Device("device1")
    back = load_params(tmp_path / "t.npz", xp=strict, device=dev)
    for k in PARAM_KEYS:
        assert_array(back[k], xp=strict, device=dev, dtype=strict.float64)
        np.testing.assert_array_equal(to_numpy(back[k]), host[k])
    back_t = load_params(tmp_path / "t.npz", xp=torch)
    assert isinstance(back_t["Wf"], torch.Tensor) and back_t["Wf"].dtype == torch.float64


def test_path_used_as_given_and_file_objects(tmp_path):
    host = host_params()
    path = tmp_path / "weights.bin"
    save_params(str(path), host)
    assert path.exists() and not (tmp_path / "weights.bin.npz").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]  # no temporary left over
    np.testing.assert_array_equal(load_params(str(path))["Wy"], host["Wy"])
    buf = io.BytesIO()
    save_params(buf, host)
    buf.seek(0)
    np.testing.assert_array_equal(load_params(buf)["bc"], host["bc"])


def test_file_holds_only_plain_arrays_and_metadata(tmp_path):
    path = tmp_path / "p.npz"
    save_params(path, host_params())
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == sorted([*PARAM_KEYS, "__meta__"])
        meta = json.loads(z["__meta__"].tobytes().decode())
    assert meta == {
        "format": "xlstm-params",
        "version": FORMAT_VERSION,
        "n_x": N_X,
        "n_a": N_A,
        "n_y": N_Y,
        "dtype": "float64",
    }


def test_loaded_arrays_are_independent(tmp_path):
    host = host_params()
    path = tmp_path / "p.npz"
    save_params(path, host)
    a, b = load_params(path), load_params(path)
    a["Wf"][0, 0] = 123.0
    assert b["Wf"][0, 0] == host["Wf"][0, 0]


# --------------------------------------------------------------------------- refusing files
def test_object_array_file_is_refused(tmp_path):
    entries = saved_entries(tmp_path)
    entries["Wf"] = np.array([{"evil": 1}, None], dtype=object)
    path = tmp_path / "obj.npz"
    write_npz(path, entries)  # numpy pickles object arrays inside the archive
    with pytest.raises(ValueError, match=r"(?s)obj\.npz.*(pickle|object array)"):
        load_params(path)


def test_pickle_file_is_refused(tmp_path):
    path = tmp_path / "pickle.npy"
    np.save(path, np.array([host_params()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"(?s)pickle\.npy.*(pickle|object array)"):
        load_params(path)
    path = tmp_path / "raw.pkl"
    import pickle

    path.write_bytes(pickle.dumps(host_params()))
    with pytest.raises(ValueError, match=r"(?s)raw\.pkl.*pickle"):
        load_params(path)


def test_bare_npy_array_is_refused(tmp_path):
    path = tmp_path / "one.npy"
    np.save(path, np.ones(3))
    with pytest.raises(ValueError, match=r"one\.npy.*single \.npy array"):
        load_params(path)


@pytest.mark.parametrize(
    "cut",
    [lambda n: 0, lambda n: 10, lambda n: n // 2, lambda n: n - 30],
    ids=["empty", "10-bytes", "half", "all-but-30"],
)
def test_truncated_file_is_refused(tmp_path, cut):
    path = tmp_path / "p.npz"
    save_params(path, host_params())
    data = path.read_bytes()
    bad = tmp_path / "cut.npz"
    bad.write_bytes(data[: cut(len(data))])
    with pytest.raises(ValueError, match=r"cut\.npz.*not a readable"):
        load_params(bad)


def test_corrupt_member_is_refused(tmp_path):
    path = tmp_path / "p.npz"
    save_params(path, host_params())
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("Wc.npy")
    # flip a byte inside Wc's data: the CRC check fails when the entry is read
    start = info.header_offset
    name_len = int.from_bytes(data[start + 26 : start + 28], "little")
    extra_len = int.from_bytes(data[start + 28 : start + 30], "little")
    at = start + 30 + name_len + extra_len + info.compress_size - 3
    data[at] ^= 0xFF
    bad = tmp_path / "flip.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"flip\.npz.*'Wc'"):
        load_params(bad)


def test_missing_file_is_filenotfound(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_params(tmp_path / "nope.npz")


def test_missing_key_is_refused(tmp_path):
    entries = saved_entries(tmp_path)
    del entries["bo"]
    write_npz(tmp_path / "nobo.npz", entries)
    with pytest.raises(KeyError, match=r"nobo\.npz.*'bo'"):
        load_params(tmp_path / "nobo.npz")


def test_unexpected_key_is_refused(tmp_path):
    entries = saved_entries(tmp_path)
    entries["Wz"] = np.ones((2, 2))
    write_npz(tmp_path / "extra.npz", entries)
    with pytest.raises(ValueError, match=r"extra\.npz.*Wz"):
        load_params(tmp_path / "extra.npz")


@pytest.mark.parametrize(
    "key, shape",
    [("Wi", (N_A, N_A + N_X + 1)), ("bf", (N_A,)), ("Wy", (N_Y, N_A + 1)), ("by", (N_Y + 1, 1))],
)
def test_wrong_shape_is_refused(tmp_path, key, shape):
    entries = saved_entries(tmp_path)
    entries[key] = np.zeros(shape)
    write_npz(tmp_path / "shape.npz", entries)
    with pytest.raises(ValueError, match=rf"shape\.npz.*{key}"):
        load_params(tmp_path / "shape.npz")


def test_sizes_disagreeing_with_metadata_are_refused(tmp_path):
    entries = saved_entries(tmp_path)
    entries["__meta__"] = meta_bytes(n_y=N_Y + 1)
    write_npz(tmp_path / "sizes.npz", entries)
    with pytest.raises(ValueError, match=r"sizes\.npz.*n_y"):
        load_params(tmp_path / "sizes.npz")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"Wf": np.zeros((N_A, N_A + N_X), dtype=np.int64)}, "Wf.*dtype int64"),
        ({"Wf": np.zeros((N_A, N_A + N_X), dtype=np.float16)}, "Wf.*dtype float16"),
        ({"bc": np.zeros((N_A, 1), dtype=np.float32)}, "dtypes.*float32.*float64"),
        ({"__meta__": meta_bytes(dtype="float32")}, "metadata says 'float32'"),
    ],
)
def test_bad_dtypes_are_refused(tmp_path, change, match):
    entries = saved_entries(tmp_path)
    entries.update(change)
    write_npz(tmp_path / "dt.npz", entries)
    with pytest.raises(ValueError, match=rf"(?s)dt\.npz.*{match}"):
        load_params(tmp_path / "dt.npz")


def test_big_endian_file_loads_as_native(tmp_path):
    entries = saved_entries(tmp_path)
    entries = {k: (v.astype(">f8") if k != "__meta__" else v) for k, v in entries.items()}
    write_npz(tmp_path / "be.npz", entries)
    back = load_params(tmp_path / "be.npz")
    host = host_params()
    for k in PARAM_KEYS:
        assert back[k].dtype == np.float64 and back[k].dtype.isnative
        np.testing.assert_array_equal(back[k], host[k])


@pytest.mark.parametrize(
    "meta, match",
    [
        (None, "no __meta__"),
        (np.frombuffer(b"{not json", dtype=np.uint8), "not valid UTF-8 JSON"),
        (np.frombuffer(b"\xff\xfe", dtype=np.uint8), "not valid UTF-8 JSON"),
        (np.frombuffer(b"[1, 2]", dtype=np.uint8), "JSON object"),
        (np.arange(4.0), "uint8"),
        (meta_bytes(format="something-else"), "not an xlstm parameter file"),
        (meta_bytes(version=FORMAT_VERSION + 1), "unknown format version"),
        (meta_bytes(version="1"), "unknown format version"),
        (meta_bytes(version=0), "unknown format version"),
        (meta_bytes(n_a=0), "'n_a'"),
        (meta_bytes(n_x="3"), "'n_x'"),
        (meta_bytes(dtype="float16"), "'dtype'"),
    ],
)
def test_bad_metadata_is_refused(tmp_path, meta, match):
    entries = saved_entries(tmp_path)
    if meta is None:
        del entries["__meta__"]
    else:
        entries["__meta__"] = meta
    write_npz(tmp_path / "meta.npz", entries)
    with pytest.raises(ValueError, match=rf"meta\.npz.*{match}"):
        load_params(tmp_path / "meta.npz")


# ------------------------------------------------------------------------------ saving errors
def test_save_refuses_bad_params(tmp_path):
    host = host_params()
    with pytest.raises(KeyError, match="by"):
        save_params(tmp_path / "x.npz", {k: v for k, v in host.items() if k != "by"})
    with pytest.raises(ValueError, match="bc"):
        save_params(tmp_path / "x.npz", dict(host, bc=np.zeros((N_A + 1, 1))))
    with pytest.raises(TypeError, match="Wo"):
        save_params(tmp_path / "x.npz", dict(host, Wo=host["Wo"].astype(np.float32)))
    assert not any(tmp_path.iterdir())


def test_load_rejects_a_non_namespace(tmp_path):
    save_params(tmp_path / "p.npz", host_params())
    with pytest.raises(TypeError, match="xp"):
        load_params(tmp_path / "p.npz", xp="numpy")
