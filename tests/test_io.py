"""save_params / load_params: round trips on every backend and refusal of bad files."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import re
import stat
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from crafted_npz import deflated_zeros, npy, npy_header, stored, write_zip
from helpers import assert_array, assert_close, time_limit, to_numpy, to_xp
from xlstm.params import PARAM_KEYS, init_params

import xlstm
from xlstm.io import FORMAT_VERSION, load_params, save_params

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


def meta_raw(text):
    return np.frombuffer(text, dtype=np.uint8)


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
    assert meta == {  # the notebook's dict keeps the layout of version 1
        "format": "xlstm-params",
        "version": 1,
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
        (meta_bytes(extra=1), r"unknown fields \['extra'\]"),
        (meta_bytes(format="[[[[[[{{{{{{"), "not an xlstm parameter file"),  # brackets in text
        (meta_raw(b'{"x": ' + b"[" * 1000 + b"]" * 1000 + b"}"), "nested 1001 levels deep"),
        (meta_raw(b'{"x": {"y": [[[0]]]}}'), "nested 5 levels deep"),
        (meta_raw(b'{"format": "xlstm-params", "format": "xlstm-params"}'), "duplicate fields"),
        (meta_bytes(format="x" * 140000), "metadata over 131072 bytes"),
        (np.zeros(1 << 20, dtype=np.uint8), "metadata over 131072 bytes"),
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


def good_members(tmp_path, **replace):
    """The entries of a good file as zip members; ``replace`` swaps members by key."""
    members = {k: stored(k + ".npy", npy(v)) for k, v in saved_entries(tmp_path).items()}
    members.update(replace)
    return [m for m in members.values() if m is not None]


def test_hand_written_zip_of_good_entries_loads(tmp_path):
    # the crafting helper itself: the same entries in a hand-written zip load as saved
    write_zip(tmp_path / "hand.npz", good_members(tmp_path))
    back = load_params(tmp_path / "hand.npz")
    for k in PARAM_KEYS:
        np.testing.assert_array_equal(back[k], host_params()[k])
        assert back[k].flags.writeable and back[k].flags.c_contiguous


@pytest.mark.parametrize(
    "content, match",
    [
        (b"hello, this is a text file\n", "not a zip archive"),
        (bytes(range(256)) * 4, "not a zip archive"),
        (b"\x00", "not a zip archive"),
        (b"PK\x03\x04" + bytes(100), "damaged, truncated or unsupported zip archive"),
    ],
    ids=["text", "binary", "one-byte", "zip-start"],
)
def test_non_zip_file_is_refused_clearly(tmp_path, content, match):
    path = tmp_path / "plain.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"plain\.npz.*not a readable.*{match}") as info:
        load_params(path)
    assert "pickle" not in str(info.value)


def test_duplicate_entries_are_refused(tmp_path):
    members = good_members(tmp_path)
    wf = next(m for m in members if m.name == "Wf.npy")
    write_zip(tmp_path / "dup.npz", [*members, stored("Wf.npy", npy(np.zeros((1, 1))))])
    with pytest.raises(ValueError, match=r"dup\.npz.*duplicate entries \['Wf\.npy'\]"):
        load_params(tmp_path / "dup.npz")
    # even when both copies are identical
    write_zip(tmp_path / "dup2.npz", [*members, wf])
    with pytest.raises(ValueError, match=r"dup2\.npz.*duplicate"):
        load_params(tmp_path / "dup2.npz")


@pytest.mark.parametrize("name", ["notes.txt", "Wf", "sub/", "__meta__.json"])
def test_entry_that_is_not_npy_is_refused(tmp_path, name):
    write_zip(tmp_path / "odd.npz", [*good_members(tmp_path), stored(name, b"hello")])
    with pytest.raises(ValueError, match=rf"odd\.npz.*{re.escape(repr(name))} is not an \.npy"):
        load_params(tmp_path / "odd.npz")


def test_encrypted_or_exotically_compressed_entries_are_refused(tmp_path):
    bz2 = zipfile.ZIP_BZIP2
    wf = stored("Wf.npy", npy(host_params()["Wf"]))
    write_zip(tmp_path / "bz.npz", good_members(tmp_path, Wf=dataclasses.replace(wf, method=bz2)))
    with pytest.raises(ValueError, match=r"bz\.npz.*'Wf'.*compression method 12"):
        load_params(tmp_path / "bz.npz")
    write_zip(tmp_path / "enc.npz", good_members(tmp_path, Wf=dataclasses.replace(wf, flags=1)))
    with pytest.raises(ValueError, match=r"enc\.npz.*'Wf' is encrypted"):
        load_params(tmp_path / "enc.npz")


def test_deflated_entries_load(tmp_path):
    entries = saved_entries(tmp_path)
    with open(tmp_path / "z.npz", "wb") as f:
        np.savez_compressed(f, **entries)
    back = load_params(tmp_path / "z.npz")
    for k in PARAM_KEYS:
        np.testing.assert_array_equal(back[k], entries[k])


def test_fortran_ordered_entries_load(tmp_path):
    entries = {k: np.asfortranarray(v) for k, v in saved_entries(tmp_path).items()}
    write_npz(tmp_path / "f.npz", entries)
    with zipfile.ZipFile(tmp_path / "f.npz") as zf:
        assert b"'fortran_order': True" in zf.read("Wf.npy")[:128]
    back = load_params(tmp_path / "f.npz")
    for k in PARAM_KEYS:
        np.testing.assert_array_equal(back[k], entries[k])
        assert back[k].flags.writeable


@pytest.mark.parametrize(
    "member, match",
    [
        # an .npy header too long to be read safely
        (stored("Wf.npy", b"\x93NUMPY\x01\x00" + (2000).to_bytes(2, "little") + b" " * 2000),
         r"cannot read entry 'Wf'.*Header"),
        # an .npy version numpy never writes for float arrays
        (stored("Wf.npy", b"\x93NUMPY\x03\x00" + npy(np.zeros((N_A, N_A + N_X)))[8:]),
         r"cannot read entry 'Wf'.*version 3\.0"),
        (stored("Wf.npy", b"not an npy file at all"), r"cannot read entry 'Wf'"),
        (stored("Wf.npy", npy_header((N_A, N_A + N_X), descr="<c16")),
         r"'Wf' has dtype complex128"),
        (stored("Wf.npy", npy_header((N_A, N_A + N_X), descr=[("a", "<f8")])),
         r"'Wf' has dtype"),
        (stored("Wf.npy", npy_header((N_A, N_A + N_X), descr="|O")), "object array"),
        # the zip directory and the header disagree on the entry's size
        (stored("Wf.npy", npy(np.zeros((N_A, N_A + N_X)))[:-8]),
         r"'Wf' is 344 bytes according to the zip directory.*128 \+ 224"),
        # a stored entry longer than its stored bytes, or than the file: refused from the
        # zip directory, before anything of it is read
        (dataclasses.replace(stored("Wf.npy", npy(np.zeros((N_A, N_A + N_X)))), file_size=10**9),
         r"entry 'Wf' declares 1000000000 bytes stored in 352, which a file of \d+ bytes"),
        (dataclasses.replace(stored("Wf.npy", npy(np.zeros((N_A, N_A + N_X)))[:-8]),
                             file_size=128 + 224),
         r"entry 'Wf' declares 352 bytes stored in 344"),
    ],
    ids=["long-header", "npy-v3", "not-npy", "complex", "structured", "object", "size-short",
         "size-huge", "data-short"],
)
def test_bad_npy_entries_are_refused(tmp_path, member, match):
    write_zip(tmp_path / "bad.npz", good_members(tmp_path, Wf=member))
    with pytest.raises(ValueError, match=rf"(?s)bad\.npz.*{match}"):
        load_params(tmp_path / "bad.npz")


@pytest.mark.parametrize("kind", ["notebook", "tree"])
@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_damaged_files_raise_only_clear_errors(tmp_path, compressed, kind):
    # random byte changes anywhere in a good file: it loads, or ValueError / KeyError
    save = np.savez_compressed if compressed else np.savez
    buf = io.BytesIO()
    save(buf, **(saved_entries(tmp_path) if kind == "notebook" else tree_entries(tmp_path)))
    good = buf.getvalue()
    rng = np.random.default_rng(8)
    for _ in range(400):
        bad = bytearray(good)
        for at in rng.integers(0, len(bad), size=rng.choice([1, 2, 8])):
            bad[at] = rng.integers(0, 256)
        with contextlib.suppress(ValueError, KeyError):
            load_params(io.BytesIO(bytes(bad)))


def test_oversized_zip_directory_is_refused(tmp_path):
    filler = [stored(f"x{i:04d}.npy", b"") for i in range(3000)]
    write_zip(tmp_path / "many.npz", [*good_members(tmp_path), *filler])
    with pytest.raises(ValueError, match=r"many\.npz.*3011 entries"):
        load_params(tmp_path / "many.npz")


def test_parameters_over_the_size_limit_are_refused(tmp_path, monkeypatch):
    import xlstm.io

    entries = saved_entries(tmp_path)
    # metadata declaring 2**20 hidden units: 32 TiB of parameters, refused before any header
    entries["__meta__"] = meta_bytes(n_a=1 << 20)
    write_npz(tmp_path / "big.npz", entries)
    with pytest.raises(ValueError, match=r"big\.npz.*\d+ bytes of parameters.*MAX_LOAD_BYTES"):
        load_params(tmp_path / "big.npz")
    # the limit is the module attribute at call time
    save_params(tmp_path / "p.npz", host_params())
    size = 8 * (4 * N_A * (N_A + N_X) + 4 * N_A + N_Y * N_A + N_Y)
    monkeypatch.setattr(xlstm.io, "MAX_LOAD_BYTES", size - 1)
    with pytest.raises(ValueError, match=rf"{size} bytes of parameters"):
        load_params(tmp_path / "p.npz")
    monkeypatch.setattr(xlstm.io, "MAX_LOAD_BYTES", size)
    np.testing.assert_array_equal(load_params(tmp_path / "p.npz")["Wf"], host_params()["Wf"])


_PEAK_SCRIPT = """
import json, os, sys, tempfile, tracemalloc
import numpy as np
from xlstm.io import load_params, save_params
from xlstm.params import init_params
try:
    import resource
except ImportError:
    resource = None
def rss():
    if resource is None:
        return None
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
good = os.path.join(tempfile.mkdtemp(), "good.npz")
save_params(good, init_params(3, 4, 2, seed=0))
load_params(good)  # every import and code path of a good load, before the baseline
before = rss()
tracemalloc.start()
try:
    load_params(sys.argv[1])
    error = None
except ValueError as exc:
    error = str(exc)
traced = tracemalloc.get_traced_memory()[1]
after = rss()
print(json.dumps({"error": error, "traced": traced,
                  "rss": None if before is None else after - before}))
"""


def peak_memory_of_load(path):
    """Load ``path`` in a fresh interpreter: its error and the memory the load added."""
    import xlstm

    root = pathlib.Path(xlstm.__file__).resolve().parents[1]  # the xlstm this test imports
    paths = [str(root), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True,
        env=env, cwd=root, check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", ["shape-lie", "size-lie"])
def test_crafted_huge_entry_is_refused_with_bounded_memory(tmp_path, variant):
    if variant == "shape-lie":
        # About 1 MB of file: Wf's header declares a (2**27,) float64 array, and 1 GiB of
        # deflated zeros follow. numpy.load read all of it before any check (+1 GiB).
        wf = deflated_zeros("Wf.npy", npy_header((1 << 27,)), 64)
        members = good_members(tmp_path, Wf=wf)
        match = r"'Wf' has shape \(134217728,\)"
    else:
        # Metadata, headers and zip directory all agree on 4 weights of 4096 x 4097 float64
        # (537 MB, under the limit), but Wf holds only 16 MiB: memory follows the data that
        # is there, not what the headers promise.
        n_a, n_x = 4096, 1
        head = npy_header((n_a, n_a + n_x))
        full = len(head) + 8 * n_a * (n_a + n_x)
        members = {
            "__meta__": stored("__meta__.npy", npy(meta_bytes(n_a=n_a, n_x=n_x, n_y=N_Y))),
            "Wf": dataclasses.replace(deflated_zeros("Wf.npy", head, 1), file_size=full),
        }
        for k in PARAM_KEYS[1:]:
            shape = {"b": (n_a, 1), "W": (n_a, n_a + n_x)}[k[0]]
            shape = {"Wy": (N_Y, n_a), "by": (N_Y, 1)}.get(k, shape)
            members[k] = stored(k + ".npy", npy(np.zeros(shape))) if k[0] == "b" or k == "Wy" \
                else deflated_zeros(k + ".npy", head, 0)
            if k in ("Wi", "Wc", "Wo"):
                members[k] = dataclasses.replace(members[k], file_size=full)
        members = list(members.values())
        # (refused from the zip directory: deflate cannot expand 16 KiB into 134 MB)
        match = r"'Wf' is truncated|cannot read entry 'Wf'|'Wf' declares \d+ bytes stored in"
    path = tmp_path / "crafted.npz"
    write_zip(path, members)
    assert path.stat().st_size < 2 << 20
    got = peak_memory_of_load(path)
    limit = 100 << 20
    assert got["traced"] < limit, f"load_params traced {got['traced'] / 2**20:.0f} MiB"
    if got["rss"] is not None:
        assert got["rss"] < limit, f"load_params added {got['rss'] / 2**20:.0f} MiB of RSS"
    assert got["error"] is not None and re.search(match, got["error"]), got["error"]



# ------------------------------------------------------------------------------------ trees
def model_tree(xp=None, device=None, dtype=np.float64):
    """A trained model's tree: a 2-layer LSTM's params and a linear head (numpy's array-API
    namespace by default: plain numpy 1.26 takes no ``device``)."""
    xp = xlstm._lib.compat.default_namespace() if xp is None else xp
    model = xlstm.LSTM(N_X, N_A, num_layers=2, xp=xp, dtype=dtype, device=device, seed=3)
    rng = np.random.default_rng(4)
    head = {"Wy": rng.standard_normal((N_Y, N_A)), "by": rng.standard_normal((N_Y, 1))}
    return {"rnn": model.params, "head": to_xp(head, xp, device, dtype=dtype)}


def same_tree(got, want, check):
    """``got`` has the structure of ``want`` (lists and dicts, keys in order), and
    ``check(got_leaf, want_leaf)`` holds for every leaf."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for k in want:
            same_tree(got[k], want[k], check)
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            same_tree(g, w, check)
    else:
        check(got, want)


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("what", ["model.params", "rnn-and-head"])
def test_tree_round_trip_on_every_backend(xp, device, tmp_path, dtype_name, what):
    dtype = getattr(xp, dtype_name)
    tree = model_tree(xp, device, dtype)
    tree = tree["rnn"] if what == "model.params" else tree
    save_params(tmp_path / "t.npz", tree)
    back = load_params(tmp_path / "t.npz", xp=xp, device=device)
    same_tree(back, tree, lambda got, want: assert_close(
        got, to_numpy(want), xp=xp, device=device, dtype=dtype, rtol=0, atol=0))

    def on_numpy(got, want):  # numpy by default, the saved dtype kept
        assert isinstance(got, np.ndarray) and got.dtype == np.dtype(dtype_name)
        np.testing.assert_array_equal(got, to_numpy(want))

    same_tree(load_params(tmp_path / "t.npz"), tree, on_numpy)
    # a loaded tree runs the model it came from
    model = xlstm.LSTM(N_X, N_A, num_layers=2, xp=xp, dtype=dtype, device=device)
    rnn = back if what == "model.params" else back["rnn"]
    x = to_xp(np.ones((N_X, 2, 3)), xp, device, dtype=dtype)
    y_back, _, _ = model.forward(x, params=rnn, return_cache=False)
    y_want, _, _ = model.forward(x, params=tree if what == "model.params" else tree["rnn"],
                                 return_cache=False)
    assert_close(y_back, to_numpy(y_want), xp=xp, device=device, dtype=dtype, rtol=0, atol=0)


def test_tree_file_holds_plain_arrays_and_describes_every_leaf(tmp_path):
    tree = model_tree()
    save_params(tmp_path / "t.npz", tree)
    with np.load(tmp_path / "t.npz", allow_pickle=False) as z:
        meta = json.loads(z["__meta__"].tobytes().decode())
        assert sorted(z.files) == sorted(["__meta__", *(str(i) for i in range(26))])
        leaf = z["12"]
    assert meta["format"] == "xlstm-params" and meta["version"] == 2 == FORMAT_VERSION - 1
    assert meta["dtype"] == "float64" and len(meta["leaves"]) == 26
    assert meta["leaves"][0] == {"path": ["rnn", 0, "Wf"], "shape": [N_A, N_A + N_X]}
    assert meta["leaves"][12] == {"path": ["rnn", 1, "Wf"], "shape": [N_A, 2 * N_A]}
    assert meta["leaves"][-1] == {"path": ["head", "by"], "shape": [N_Y, 1]}
    np.testing.assert_array_equal(leaf, tree["rnn"][1]["Wf"])


def test_tree_tuples_come_back_as_lists_and_file_objects_work(tmp_path):
    a, b = np.arange(3.0), np.ones((2, 2))
    buf = io.BytesIO()
    save_params(buf, {"pair": (a, b), "deep": [[{"x": a}]], "": [b]})
    buf.seek(0)
    back = load_params(buf)
    assert list(back) == ["pair", "deep", ""] and isinstance(back["pair"], list)
    np.testing.assert_array_equal(back["pair"][1], b)
    np.testing.assert_array_equal(back["deep"][0][0]["x"], a)
    save_params(tmp_path / "t.npz", [a])  # a bare list is a tree
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temporary left over
    np.testing.assert_array_equal(load_params(tmp_path / "t.npz")[0], a)


def test_version_1_file_written_by_earlier_versions_loads(tmp_path):
    # exactly what save_params wrote before trees existed: ten entries and a flat metadata
    host = host_params()
    meta = {"format": "xlstm-params", "version": 1, "n_x": N_X, "n_a": N_A, "n_y": N_Y,
            "dtype": "float64"}
    text = json.dumps(meta, sort_keys=True).encode("utf-8")
    write_npz(tmp_path / "v1.npz", {**host, "__meta__": np.frombuffer(text, dtype=np.uint8)})
    back = load_params(tmp_path / "v1.npz")
    assert isinstance(back, dict) and list(back) == list(PARAM_KEYS)
    for k in PARAM_KEYS:
        np.testing.assert_array_equal(back[k], host[k])


def tree_entries(tmp_path):
    """The entries of a good tree file (a model's params and a head), meta included."""
    path = tmp_path / "good_tree.npz"
    save_params(path, model_tree())
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def tree_meta(entries):
    return json.loads(entries["__meta__"].tobytes().decode())


def with_leaves(entries, leaves, **fields):
    """``entries`` with the metadata's leaves (and other fields) replaced."""
    meta = {**tree_meta(entries), "leaves": leaves, **fields}
    return {**entries, "__meta__": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}


def leaf(path, shape=(1,)):
    return {"path": list(path), "shape": list(shape)}


def small(paths):
    """Entries of a tree file whose metadata lists ``paths``, each leaf a (1,) array."""
    meta = {"format": "xlstm-params", "version": 2, "dtype": "float64",
            "leaves": [leaf(p) for p in paths]}
    entries = {str(i): np.zeros(1) for i in range(len(paths))}
    entries["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return entries


@pytest.mark.parametrize("paths, match", [
    ([[0], [2]], r"params as a list with the indices \[0, 2\]; a list's indices are 0 to n - 1"),
    ([[1], [0]], r"out of depth-first order: place 0 of the tree holds leaf 1"),
    ([["a", 1], ["a", 0]], r"out of depth-first order: place 0 of the tree holds leaf 1"),
    ([["a", 0], ["b"], ["a", 1]], r"out of depth-first order"),
    ([[0], ["a"]], r"params both string keys and integer indices"),
    ([["a"], ["a"]], r"leaf 1 repeats the path params\['a'\] of leaf 0"),
    ([["a", "b"], ["a"]], r"leaf 1 is at params\['a'\], a branch of other leaves"),
    ([["a"], ["a", "b"]], r"leaf 1 \(params\['a'\]\['b'\]\) goes through params\['a'\], which "
                          r"is leaf 0"),
    ([[]], r"leaf 0 has the path \[\]; a path is a list of 1 to 8"),
    ([["a", 1.0]], r"leaf 0 has the path \['a', 1.0\]"),
    ([["a", True]], r"leaf 0 has the path \['a', True\]"),
    ([["a", -1]], r"leaf 0 has the path \['a', -1\]"),
    ([["a", None]], r"leaf 0 has the path"),
    ([[["a"]]], r"nested 5 levels deep"),
    ([list("abcdefghi")], r"leaf 0 has the path .*a list of 1 to 8 dict keys"),  # too deep
], ids=["gap", "reversed", "order", "interleaved", "mixed", "twice", "leaf-on-branch",
        "branch-on-leaf", "empty-path", "float", "bool", "negative", "null", "nested-path",
        "too-deep"])
def test_tree_with_a_bad_structure_is_refused(tmp_path, paths, match):
    write_npz(tmp_path / "tree.npz", small(paths))
    with pytest.raises(ValueError, match=rf"tree\.npz.*{match}"):
        load_params(tmp_path / "tree.npz")


def test_deepest_and_widest_trees_load(tmp_path):
    write_npz(tmp_path / "deep.npz", small([list("abcdefgh")]))
    back = load_params(tmp_path / "deep.npz")
    assert back["a"]["b"]["c"]["d"]["e"]["f"]["g"]["h"].shape == (1,)
    write_npz(tmp_path / "wide.npz", small([[i] for i in range(1024)]))
    assert len(load_params(tmp_path / "wide.npz")) == 1024


@pytest.mark.parametrize("change, match", [
    ({"leaves": [leaf([i]) for i in range(1025)]}, r"'leaves' must be a list of 1 to 1024 "
                                                     r"leaves, got a list of 1025"),
    ({"leaves": []}, r"'leaves' must be a list of 1 to 1024 leaves, got a list of 0"),
    ({"leaves": {"path": ["a"], "shape": [1]}}, r"'leaves' must be a list"),
    ({"leaves": None}, r"'leaves' must be a list"),
    ({"leaves": [["a"], [1]]}, r"leaf 0 must be an object with exactly the fields "
                               r"\['path', 'shape'\]"),
    ({"leaves": [{"path": ["a"], "shape": [1], "dtype": "float64"}]}, r"leaf 0 must be an "
                                                                       r"object"),
    ({"leaves": [{"path": ["a"]}]}, r"leaf 0 must be an object"),
    ({"leaves": [leaf(["a"], [-1])]}, r"params\['a'\]\) has the shape \[-1\]"),
    ({"leaves": [leaf(["a"], [1.0])]}, r"has the shape \[1.0\]"),
    ({"leaves": [leaf(["a"], [1] * 9)]}, r"a shape is a list of at most 8 integers"),
    ({"leaves": [{"path": ["a"], "shape": 1}]}, r"has the shape 1;"),
    ({"n_x": 3}, r"unknown fields \['n_x'\]; version 2 has exactly"),
], ids=["too-many", "none", "object", "null", "lists", "extra-field", "no-shape",
        "negative-dim", "float-dim", "ndim", "scalar-shape", "v1-field"])
def test_tree_with_bad_leaf_records_is_refused(tmp_path, change, match):
    meta = {"format": "xlstm-params", "version": 2, "dtype": "float64",
            "leaves": [leaf(["a"])], **change}
    entries = {"0": np.zeros(1), "__meta__": np.frombuffer(json.dumps(meta).encode(),
                                                           dtype=np.uint8)}
    write_npz(tmp_path / "tree.npz", entries)
    with pytest.raises(ValueError, match=rf"tree\.npz.*{match}"):
        load_params(tmp_path / "tree.npz")


def test_tree_leaf_missing_or_extra_is_refused(tmp_path):
    entries = tree_entries(tmp_path)
    write_npz(tmp_path / "missing.npz", {k: v for k, v in entries.items() if k != "13"})
    with pytest.raises(KeyError, match=r"missing\.npz.*'13' \(params\['rnn'\]\[1\]\['bf'\]\) "
                                       r"is missing"):
        load_params(tmp_path / "missing.npz")
    write_npz(tmp_path / "extra.npz", {**entries, "26": np.zeros(1)})
    with pytest.raises(ValueError, match=r"extra\.npz.*unexpected entries \['26'\].*26 leaves"):
        load_params(tmp_path / "extra.npz")
    # a leaf dropped from the metadata but left in the archive
    meta = tree_meta(entries)
    write_npz(tmp_path / "fewer.npz", with_leaves(entries, meta["leaves"][:-1]))
    with pytest.raises(ValueError, match=r"fewer\.npz.*unexpected entries \['25'\]"):
        load_params(tmp_path / "fewer.npz")


def test_tree_leaf_shape_or_dtype_disagreeing_is_refused(tmp_path):
    entries = tree_entries(tmp_path)
    leaves = tree_meta(entries)["leaves"]
    leaves[0] = {**leaves[0], "shape": [N_A, N_A + N_X + 1]}
    write_npz(tmp_path / "shape.npz", with_leaves(entries, leaves))
    with pytest.raises(ValueError, match=r"shape\.npz.*'0' \(params\['rnn'\]\[0\]\['Wf'\]\) "
                                         r"has shape \(4, 7\), but the metadata records "
                                         r"\(4, 8\)"):
        load_params(tmp_path / "shape.npz")
    write_npz(tmp_path / "entry.npz", {**entries, "25": np.zeros((N_Y + 1, 1))})
    with pytest.raises(ValueError, match=r"entry\.npz.*params\['head'\]\['by'\]\) has shape"):
        load_params(tmp_path / "entry.npz")
    write_npz(tmp_path / "dtype.npz", {**entries, "3": entries["3"].astype(np.float32)})
    with pytest.raises(ValueError, match=r"dtype\.npz.*dtypes \['float32', 'float64'\]"):
        load_params(tmp_path / "dtype.npz")
    write_npz(tmp_path / "obj.npz", {**entries, "3": np.array([None], dtype=object)})
    with pytest.raises(ValueError, match=r"obj\.npz.*entry '3' \(params\['rnn'\]\[0\]\['bi'\]\) "
                                         r"is an object array"):
        load_params(tmp_path / "obj.npz")


def test_tree_over_the_size_limit_is_refused_before_reading(tmp_path):
    entries = tree_entries(tmp_path)
    leaves = tree_meta(entries)["leaves"]
    leaves[0] = {**leaves[0], "shape": [1 << 20, 1 << 20]}
    write_npz(tmp_path / "big.npz", with_leaves(entries, leaves))
    with pytest.raises(ValueError, match=r"big\.npz.*\d+ bytes of parameters \(26 arrays, "
                                         r"float64\).*MAX_LOAD_BYTES"):
        load_params(tmp_path / "big.npz")


def test_save_refuses_trees_it_cannot_store(tmp_path):
    a = np.ones(2)
    deep = a
    for _ in range(9):
        deep = [deep]
    cases = [
        ({"rnn": [{"Wf": a}], "head": {1: a}}, TypeError,
         r"params\['head'\] has the key 1 \(int\).*str keys"),
        ({"rnn": [], "head": {"Wy": a}}, ValueError, r"params\['rnn'\] is empty"),
        ({"a": {}}, ValueError, r"params\['a'\] is empty"),
        ([], ValueError, r"params is empty"),
        (deep, ValueError, r"params\[0\]\[0\]\[0\]\[0\]\[0\]\[0\]\[0\]\[0\] nests deeper than "
                           r"the 8 levels"),
        ([a] * 1025, ValueError, r"more than the 1024 arrays"),
        ({"a": [a, a.astype(np.float32)]}, TypeError, r"params\['a'\]\[1\]"),
        ({"a": [a, "text"]}, TypeError, r"params\['a'\]\[1\] must be an array"),
        ({"a": [a.astype(np.float16)]}, TypeError, r"float32 or float64"),
        ({"k" * 200000: [a]}, ValueError, r"takes \d+ bytes, over the 131072"),
    ]
    for tree, error, match in cases:
        with pytest.raises(error, match=match):
            save_params(tmp_path / "x.npz", tree)
    assert not any(tmp_path.iterdir())


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


# ------------------------------------------------------------------------- file permissions
posix_modes = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@posix_modes
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o000])
def test_new_file_honours_the_umask(tmp_path, mask):
    with umask(mask):
        save_params(tmp_path / "p.npz", host_params())
        with open(tmp_path / "by_open", "wb"):
            pass
    mode = stat.S_IMODE((tmp_path / "p.npz").stat().st_mode)
    assert mode == 0o666 & ~mask == stat.S_IMODE((tmp_path / "by_open").stat().st_mode)


@posix_modes
@pytest.mark.parametrize("existing", [0o640, 0o604, 0o600, 0o666])
def test_replaced_file_keeps_its_mode(tmp_path, existing):
    path = tmp_path / "p.npz"
    path.write_bytes(b"old contents")
    path.chmod(existing)
    with umask(0o077):
        save_params(path, host_params())
    assert stat.S_IMODE(path.stat().st_mode) == existing
    np.testing.assert_array_equal(load_params(path)["Wf"], host_params()["Wf"])


@posix_modes
def test_umask_is_read_without_proc_too(monkeypatch):
    import xlstm.io

    for mask in (0o022, 0o077, 0o027):
        with umask(mask):
            assert xlstm.io._umask() == mask
            monkeypatch.setattr(xlstm.io, "_PROC_STATUS", "/nonexistent/status")
            assert xlstm.io._umask() == mask
            monkeypatch.undo()
            assert os.umask(mask) == mask  # and left unchanged


def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "p.npz"
    save_params(path, host_params())
    before = path.read_bytes()

    def half_then_fail(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_params(path, dict(host_params(), Wf=host_params()["Wf"] + 1.0))
    with pytest.raises(OSError, match="disk full"):
        save_params(tmp_path / "new.npz", host_params())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npz"]
    assert path.read_bytes() == before


def test_save_replaces_through_a_new_file(tmp_path):
    # the new contents appear under the name in one step: a reader holding the old file
    # keeps reading the old contents
    path = tmp_path / "p.npz"
    save_params(path, host_params())
    with open(path, "rb") as old:
        save_params(path, dict(host_params(), Wf=host_params()["Wf"] + 1.0))
        np.testing.assert_array_equal(load_params(old)["Wf"], host_params()["Wf"])
    np.testing.assert_array_equal(load_params(path)["Wf"], host_params()["Wf"] + 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["p.npz"]


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_its_counters(tmp_path):
    """save_checkpoint writes version 3, the tree and the counters; load_checkpoint gives
    both back, load_params the tree; a 0-d integer array is a counter too."""
    from xlstm.io import load_checkpoint, save_checkpoint

    tree = {"params": model_tree(), "opt_state": {"m": [np.ones((2, 2))]}}
    save_checkpoint(tmp_path / "c.npz", tree, {"step": 7, "epoch": np.int64(1)})
    back, counters = load_checkpoint(tmp_path / "c.npz")
    assert counters == {"step": 7, "epoch": 1}
    assert isinstance(counters["epoch"], int)
    np.testing.assert_array_equal(back["params"]["rnn"][1]["Wf"], tree["params"]["rnn"][1]["Wf"])
    assert list(load_params(tmp_path / "c.npz")) == ["params", "opt_state"]
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        meta = json.loads(z["__meta__"].tobytes().decode())
    assert meta["version"] == 3 == FORMAT_VERSION
    save_params(tmp_path / "p.npz", tree)
    with pytest.raises(ValueError, match=r"p\.npz': not a checkpoint \(format version 2"):
        load_checkpoint(tmp_path / "p.npz")


@pytest.mark.parametrize("counters, match", [
    ({"step": -1}, r"counters\['step'\] must be an integer in \[0, 2\*\*53\)"),
    ({"step": 1.0}, r"counters\['step'\] must be an integer"),
    ({"step": True}, r"counters\['step'\] must be an integer"),
    ({"step": 2 ** 53}, r"counters\['step'\] must be an integer"),
    ({"": 1}, r"a counter's name must be a str of 1 to 64 characters"),
    ({f"c{i}": i for i in range(33)}, r"counters must be a dict of at most 32"),
    ([1], r"counters must be a dict"),
])
def test_bad_counters_are_refused_on_saving(tmp_path, counters, match):
    from xlstm.io import save_checkpoint

    with pytest.raises(ValueError, match=match):
        save_checkpoint(tmp_path / "c.npz", {"p": [np.ones(2)]}, counters)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("counters, match", [
    (None, r"counters must be a dict"),
    ({"step": -1}, r"counters\['step'\] must be an integer"),
    ({"step": "7"}, r"counters\['step'\] must be an integer"),
])
def test_bad_counters_are_refused_on_loading(tmp_path, counters, match):
    from xlstm.io import load_checkpoint

    meta = {"format": "xlstm-params", "version": 3, "dtype": "float64",
            "leaves": [leaf(["a"])], "counters": counters}
    entries = {"0": np.zeros(1), "__meta__": np.frombuffer(json.dumps(meta).encode(),
                                                           dtype=np.uint8)}
    write_npz(tmp_path / "c.npz", entries)
    for read in (load_params, load_checkpoint):
        with pytest.raises(ValueError, match=rf"c\.npz.*{match}"):
            read(tmp_path / "c.npz")


def test_a_checkpoint_needs_a_nested_tree(tmp_path):
    from xlstm.io import save_checkpoint

    with pytest.raises(TypeError, match="tree must be nested"):
        save_checkpoint(tmp_path / "c.npz", {"W": np.ones(2)}, {"step": 1})


# ------------------------------------------------------------- files that are not regular
def _special_files(tmp_path):
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    found = {"fifo": (fifo, r"a FIFO \(named pipe\)"), "directory": (folder, "a directory")}
    for dev in ("/dev/zero", "/dev/urandom"):
        if os.path.exists(dev):
            found[dev] = (pathlib.Path(dev), "a character device")
    return found


@pytest.mark.parametrize("loader", ["load_params", "load_checkpoint"])
def test_only_regular_files_are_read(tmp_path, loader):
    """A FIFO (which hung in open), /dev/zero and /dev/urandom (read until the kernel
    killed the process), a directory: refused before they are read, by what they are."""
    from xlstm import io as xio

    load = getattr(xio, loader)
    for name, (path, kind) in _special_files(tmp_path).items():
        with time_limit(20), pytest.raises(ValueError, match=f"is {kind}; only regular"):
            load(path)
        with time_limit(20), pytest.raises(ValueError, match=f"is {kind}; only regular"):
            load(os.fspath(path).encode())


def test_a_fifo_swapped_in_after_the_check_neither_hangs_nor_is_read(tmp_path, monkeypatch):
    """The kind is checked again on the open descriptor, opened without waiting for a
    writer: a FIFO that replaces a regular file between the two checks is refused."""
    fifo = tmp_path / "p.npz"
    os.mkfifo(fifo)
    regular = os.stat(__file__)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: regular if os.fspath(p) == os.fspath(
        fifo) else real_stat(p, *a, **k))
    with time_limit(20), pytest.raises(ValueError, match="is a FIFO"):
        load_params(fifo)


def test_file_objects_that_are_not_regular_files_or_binary_are_refused(tmp_path):
    """A file object over /dev/zero or a pipe is refused by its descriptor; one in text
    mode gets the module's own message, whatever its encoding (not UnicodeDecodeError)."""
    save_params(tmp_path / "p.npz", init_params(N_X, N_A, N_Y, seed=0))
    if os.path.exists("/dev/zero"):
        with open("/dev/zero", "rb") as f, pytest.raises(ValueError, match="character device"):
            load_params(f)
    r, w = os.pipe()
    with os.fdopen(r, "rb") as f, os.fdopen(w, "wb"):
        with time_limit(20), pytest.raises(ValueError, match="a FIFO"):
            load_params(f)
    for encoding in ("utf-8", "latin-1", "ascii"):
        with open(tmp_path / "p.npz", encoding=encoding) as f:
            with pytest.raises(TypeError, match=r"must be opened in binary mode \('rb'\)"):
                load_params(f)
    with open(tmp_path / "p.npz", "rb") as f:  # binary ones still load
        assert set(load_params(f)) == set(PARAM_KEYS)
    assert set(load_params(io.BytesIO((tmp_path / "p.npz").read_bytes()))) == set(PARAM_KEYS)


def test_a_deflated_entry_beyond_deflates_ratio_is_refused_unread(tmp_path):
    """Every read is bounded by the file's size: an entry that claims more bytes than
    deflate can expand its stored bytes into is refused from the zip directory."""
    head = npy_header((N_A, N_A + N_X))
    wf = dataclasses.replace(deflated_zeros("Wf.npy", head, 0), file_size=10**9)
    write_zip(tmp_path / "bomb.npz", good_members(tmp_path, Wf=wf))
    with pytest.raises(ValueError, match=r"'Wf' declares 1000000000 bytes stored in \d+"):
        load_params(tmp_path / "bomb.npz")


def test_zero_dimensional_leaves_keep_their_shape(tmp_path):
    """A 0-d parameter (a scalar gain, say) comes back 0-d from a tree and a checkpoint."""
    from xlstm.io import load_checkpoint, save_checkpoint

    tree = {"params": {"gain": np.array(2.5), "W": np.ones((2, 3))}}
    save_params(tmp_path / "t.npz", tree)
    back = load_params(tmp_path / "t.npz")
    assert back["params"]["gain"].shape == () and float(back["params"]["gain"]) == 2.5
    save_checkpoint(tmp_path / "c.npz", tree, {"step": 3})
    again, counters = load_checkpoint(tmp_path / "c.npz")
    assert again["params"]["gain"].shape == () and counters["step"] == 3
