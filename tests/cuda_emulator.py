"""Host builds of the CUDA kernels, for the tests: the real generated source behind
``cuda_host/grid_emulator.h``, launched from :class:`xlstm._cuda.Loops` on numpy arrays.

* :func:`build` compiles :func:`xlstm._cuda.kernels.host_source` (optionally with
  AddressSanitizer, optionally from a modified kernel text) into a shared library.
* :func:`host_launch` is a ``launch`` for ``Loops(dtype, mod=numpy, launch=...)``: it checks
  every argument against the kernel table, gives each array its own heap buffer (so that an
  access one element past any argument, not only past the end of a stack, leaves the
  allocation), runs the emulated grid with a chosen block size and shuffled block order,
  copies the written arguments back and checks that the read ones were not written.
* Run as a script (``python cuda_emulator.py LIB``), it drives whole sequences through
  ``xlstm.lstm_forward`` / ``xlstm.lstm_backward`` with the library's loops and compares them
  with the array path; the ASan tests run it in a subprocess with the ASan runtime preloaded.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from xlstm import _cuda
from xlstm._cuda import kernels as table

EMULATOR_DIR = Path(__file__).resolve().parent / "cuda_host"
#: (rtol, atol) between whole sequences on the kernels and on the array path: the same
#: operations in the same order, but tanh's last bits travel through the recurrence.
SEQ_TOL = {"float32": (1e-5, 1e-6), "float64": (1e-12, 1e-13)}
ASAN_FLAGS = ("-fsanitize=address", "-fno-omit-frame-pointer", "-ffp-contract=off", "-O1", "-g")
PLAIN_FLAGS = ("-O2", "-ffp-contract=off")


def host_compiler():
    """The first of ``$CXX``, c++, g++, clang++ found on PATH, or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def asan_runtime(cxx):
    """The compiler's shared ASan runtime (to preload into Python), or None."""
    for name in ("libasan.so", "libclang_rt.asan-x86_64.so"):
        res = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True)
        path = res.stdout.strip()
        if res.returncode == 0 and os.path.isabs(path) and os.path.exists(path):
            return path
    return None


def build(cxx, directory, cell="lstm", *, asan=False, kernels=None):
    """Compile ``cell``'s host build into ``directory``; returns ``(library path, seconds)``.

    ``kernels`` replaces the generated kernel text (the tests break it on purpose). Raises
    ``RuntimeError`` with the compiler's messages if the build fails.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tag = "asan" if asan else "plain"
    cu = directory / f"xlstm_{cell}_{tag}.cu"
    cpp = directory / f"xlstm_{cell}_{tag}_host.cpp"
    lib = directory / f"libxlstm_{cell}_{tag}.so"
    cu.write_text(table.source(cell) if kernels is None else kernels, encoding="utf-8")
    cpp.write_text(table.host_source(cell, include=cu.name), encoding="utf-8")
    cmd = [cxx, "-shared", "-fPIC", "-std=c++17", *(ASAN_FLAGS if asan else PLAIN_FLAGS),
           "-Wall", "-Wextra", "-Werror", f"-I{EMULATOR_DIR}", "-o", str(lib), str(cpp)]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{res.stdout}{res.stderr}")
    return lib, seconds


def host_launch(lib, cell="lstm", *, block=_cuda.BLOCK, seed=1):
    """A ``launch`` for :class:`xlstm._cuda.Loops` that runs ``lib``'s emulated grid.

    Blocks of ``block`` threads; launch ``k`` shuffles its blocks and threads with seed
    ``seed + k`` (``seed=0``: every launch in natural order). ``launch.calls`` lists the
    steps launched.
    """
    if isinstance(lib, (str, Path)):
        lib = ctypes.CDLL(str(lib))
    calls = []
    counter = itertools.count()

    def function(k, dtype_name):
        fn = getattr(lib, k.name(dtype_name) + "_host")
        fn.restype = None
        fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_ulonglong, ctypes.c_longlong,
                       ctypes.c_longlong, *([ctypes.c_void_p] * len(k.args))]
        return fn

    def launch(step, name, total, args):
        k = table.kernel(cell, step)
        m, n, *arrays = args
        table.check_args(k, name, m, n, arrays)
        if total != m * n:
            raise AssertionError(f"{cell} {step}: {total} threads for a ({m}, {n}) grid")
        calls.append(step)
        if total == 0:
            return
        # One fresh buffer per argument; an argument that is allowed to be another one and
        # is, gets that one's buffer.
        given = {a.name: arr for a, arr in zip(k.args, arrays)}
        own = {}
        for a in k.args:
            if a.alias is not None and given[a.alias] is given[a.name]:
                own[a.name] = own[a.alias]
            else:
                own[a.name] = np.array(given[a.name], copy=True, order="C")
        bufs = [own[a.name] for a in k.args]
        grid = (total + block - 1) // block
        s = 0 if seed == 0 else seed + next(counter)
        function(k, name)(grid, block, s, m, n, *(b.ctypes.data for b in bufs))
        written = {a.alias for a in k.args if a.out and a.alias}
        for a, arr, buf in zip(k.args, arrays, bufs):
            if a.out:
                arr[...] = buf
            elif a.name not in written and buf.tobytes() != arr.tobytes():
                raise AssertionError(f"{cell} {step}: the kernel wrote its input {a.name}")

    launch.calls = calls
    return launch


def host_loops(lib, dtype, **kwargs):
    """:class:`xlstm._cuda.Loops` for ``dtype`` on numpy, launching ``lib``'s kernels."""
    return _cuda.Loops(dtype, mod=np, launch=host_launch(lib, **kwargs))


# ---------------------------------------------------------------- whole sequences
#: (n_x, n_a, n_y, m, T, block, chunk_rows): every grid's last block is partial.
SEQUENCE_CASES = (
    (3, 5, 4, 6, 7, 8, 4096),  # 30 elements in blocks of 8
    (3, 5, 4, 6, 7, 8, 12),  # the same, the input projection in chunks
    (2, 40, 3, 7, 4, _cuda.BLOCK, 4096),  # 280 elements in blocks of 256
    (2, 3, 2, 1, 3, 32, 4096),  # 3 elements in one block of 32
)


def run_sequences(lib, dtypes=("float32", "float64"), seeds=(1, 7), cases=SEQUENCE_CASES):
    """Forward (training and inference) and backward through the host build for every case,
    dtype and seed, against the array path; returns the number of sequences checked.

    The results of different seeds (block orders) must agree bit for bit.
    """
    import xlstm
    from oracles import random_case
    from xlstm import _engine

    accelerated, chunk = _engine.accelerated_loops, _engine.CHUNK_ROWS
    count = 0
    try:
        for (n_x, n_a, n_y, m, T, block, chunk_rows), dtype in itertools.product(cases, dtypes):
            _engine.CHUNK_ROWS = chunk_rows
            rng = np.random.default_rng(3)
            x, a0, c0, params = random_case(rng, n_x, n_a, n_y, m, T, dtype=dtype)
            da = rng.standard_normal((n_a, m, T - 1)).astype(dtype)

            def run(loops):
                _engine.accelerated_loops = lambda xp, dt, cell=None: loops
                a, y, c, caches = xlstm.lstm_forward(x, a0, params, c0)
                inf = xlstm.lstm_forward(x, a0, params, c0, return_caches=False)
                return {"a": a, "y": y, "c": c, "a (inference)": inf[0],
                        "y (inference)": inf[1], **xlstm.lstm_backward(da, caches)}

            want = run(None)
            first = None
            for seed in seeds:
                loops = host_loops(lib, dtype, block=block, seed=seed)
                got = run(loops)
                calls = loops.launch.calls
                case = f"{dtype} (n_a, m, T)={n_a, m, T} block={block} seed={seed}"
                assert calls.count("fwd") == 2 * T and calls.count("bwd") == T - 1, case
                assert got.keys() == want.keys(), case
                rtol, atol = SEQ_TOL[dtype]
                for key in want:
                    assert got[key].dtype == want[key].dtype, (case, key)
                    np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol,
                                               err_msg=f"{case}: {key}")
                    if first is not None:
                        np.testing.assert_array_equal(got[key], first[key], strict=True,
                                                      err_msg=f"{case}: {key} (block order)")
                first = got
                count += 1
    finally:
        _engine.accelerated_loops, _engine.CHUNK_ROWS = accelerated, chunk
    return count


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        print("usage: python cuda_emulator.py LIB [quick]", file=sys.stderr)
        return 2
    cases = SEQUENCE_CASES[:1] if argv[1:] == ["quick"] else SEQUENCE_CASES
    count = run_sequences(argv[0], cases=cases)
    print(f"cuda_emulator: {count} sequences match the array path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
