"""Host builds of the CUDA kernels, for the tests: the real generated source behind
``cuda_host/grid_emulator.h``, launched from :class:`xlstm.accel.cuda.Loops` on numpy arrays.

* :func:`build` compiles :func:`xlstm.accel.cuda.kernels.host_source` of one cell (optionally
  with AddressSanitizer, optionally from a modified kernel text) into a shared library;
  :func:`build_all` builds every cell's, in parallel.
* :func:`host_launch` is a ``launch`` for ``Loops(dtype, mod=numpy, launch=...)``: per step
  it checks every argument against the kernel table, gives each distinct array (a whole
  stack, as the kernels take them) its own heap buffer, so that an access past any stack or
  single slice leaves the allocation, runs the emulated grid with a chosen block size and
  shuffled block order, copies back the slices that the step writes and checks that nothing
  else was written.
* :func:`api_results` runs one cell's whole sequences through the public API (the model
  class's ``forward`` with and without a cache and ``backward`` with a gradient on the final
  state; for the LSTM and the tanh RNN also the notebook's ``*_forward`` / ``*_backward``).
* :func:`host_persistent_launch` is a ``persistent_launch`` for the same loops: the
  persistent kernels, every block and thread of the grid on its own host thread.
* Run as a script (``python cuda_emulator.py DIR``, with every cell's library in ``DIR``),
  it drives those sequences with the libraries' loops, per-step and persistent, and
  compares them with the array path; the ASan tests run it in a subprocess with the ASan
  runtime preloaded.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from xlstm.accel import cuda as _cuda
from xlstm.accel.cuda import kernels as table

EMULATOR_DIR = Path(__file__).resolve().parent / "cuda_host"
#: (rtol, atol) between whole sequences on the kernels and on the array path: the same
#: operations in the same order, but tanh's last bits travel through the recurrence.
SEQ_TOL = {"float32": (1e-5, 1e-6), "float64": (1e-12, 1e-13)}
#: No -g: ASan's reports name the kernel by its symbol all the same (the tests look for
#: it), and the builds take half the time; add -g for file and line when debugging.
ASAN_FLAGS = ("-fsanitize=address", "-fno-omit-frame-pointer", "-ffp-contract=off", "-O1")
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
           "-Wall", "-Wextra", "-Wpedantic", "-Werror", f"-I{EMULATOR_DIR}", "-o", str(lib), str(cpp)]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{res.stdout}{res.stderr}")
    return lib, seconds


def build_all(cxx, directory, *, asan=False):
    """:func:`build` for every cell of the table, compiled in parallel; returns ``(cell ->
    library path, seconds)``."""
    with concurrent.futures.ThreadPoolExecutor() as pool:
        start = time.perf_counter()
        jobs = {c: pool.submit(build, cxx, directory, c, asan=asan) for c in table.cells()}
        libs = {c: job.result()[0] for c, job in jobs.items()}
        return libs, time.perf_counter() - start


def _span(arr):
    """An array's memory, ``(first byte, bytes)``: the checks let two arguments share memory
    only where they are the very same array."""
    return arr.ctypes.data, arr.nbytes


def _slots(arr):
    """``arr`` as a 2-D view, one row per slice: a stack's slices, or one slice."""
    return arr.reshape(arr.shape[0] if arr.ndim == 3 else 1, -1)



def _loaded(libs):
    """The host libraries by cell, loaded (``ctypes.CDLL``) where given as paths."""
    return {c: ctypes.CDLL(str(lib)) if isinstance(lib, (str, Path)) else lib
            for c, lib in libs.items()}


def _host_function(lib, name, n_lead, params):
    """The host launcher ``<name>_host`` of ``lib``: ``n_lead`` integer sizes (grid, block,
    seed, and the persistent kernels' step count), then the kernel's ``params``, pointers
    and integers."""
    fn = getattr(lib, name + "_host")
    fn.restype = None
    fn.argtypes = [ctypes.c_uint, ctypes.c_uint, *[ctypes.c_ulonglong] * (n_lead - 2),
                   *(ctypes.c_void_p if "*" in p else ctypes.c_longlong for p in params)]
    return fn


def host_launch(libs, *, block=_cuda.BLOCK, seed=1):
    """A ``launch`` for :class:`xlstm.accel.cuda.Loops` that runs the emulated grid of the
    library of the launch's cell (``libs``: cell -> library or its path).

    ``launch(cell, step, dtype_name, total, args)`` returns ``run(s)``, which checks the
    arguments of step ``s`` against the kernel table
    (:func:`xlstm.accel.cuda.kernels.check_args`), gives each distinct array its own heap buffer
    (an array passed twice, one buffer), so that an access past any stack leaves its
    allocation, runs the grid, copies back the slices that the step writes and checks that
    nothing else changed. Blocks of ``block`` threads; launch ``k`` shuffles its blocks and
    threads with seed ``seed + k`` (``seed=0``: every launch in natural order).
    ``launch.calls`` lists the steps launched, ``launch.cells`` the cells.
    """
    libs = _loaded(libs)
    calls, cells = [], set()
    counter = itertools.count()

    def function(k, dtype_name):
        return _host_function(libs[k.cell], k.name(dtype_name), 3, table.step_params(k))

    def launch(cell, step, name, total, args):
        k = table.kernel(cell, step)
        m, n, *rest = args
        fn = function(k, name)

        def run(s):
            table.check_args(k, name, (m, n, s, *rest))
            if total != m * n:
                raise AssertionError(f"{cell} {step}: {total} threads for a ({m}, {n}) grid")
            calls.append(step)
            cells.add(cell)
            if total == 0:
                return
            own = {}
            for arr in rest[::3]:
                if _span(arr) not in own:
                    own[_span(arr)] = (arr, np.array(arr, copy=True, order="C"))
            flat = [own[_span(v)][1].ctypes.data if isinstance(v, np.ndarray) else v
                    for v in rest]
            grid = (total + block - 1) // block
            fn(grid, block, 0 if seed == 0 else seed + next(counter), m, n, s, *flat)
            written, names = {}, {}  # per array: the slices the step writes, its arguments
            for a, arr, length, base in zip(k.args, rest[::3], rest[1::3], rest[2::3]):
                names.setdefault(_span(arr), []).append(a.name)
                if a.out:
                    written.setdefault(_span(arr), set()).add((base + s) % length)
            for key, (arr, buf) in own.items():
                slots, copy = _slots(arr), _slots(buf)
                for j in range(slots.shape[0]):
                    if j in written.get(key, ()):
                        slots[j] = copy[j]
                    elif copy[j].tobytes() != slots[j].tobytes():
                        raise AssertionError(f"{cell} {step}: the kernel wrote its input "
                                             f"{', '.join(names[key])}")

        return run

    launch.calls, launch.cells = calls, cells
    return launch


def host_persistent_launch(libs, *, seed=1):
    """A ``persistent_launch`` for :class:`xlstm.accel.cuda.Loops` that runs the persistent
    kernel of the library of the launch's cell with every block and thread of the grid on
    its own host thread (``launch_concurrent`` of the grid emulator).

    The arguments are checked (:func:`xlstm.accel.cuda.kernels.check_persistent_args`); each
    distinct array gets its own heap buffer (an array passed twice, one buffer), so that an
    access past any stack leaves its allocation; the written ones are copied back and the
    others checked unchanged. Launch ``k`` starts its threads in an order shuffled with
    seed ``seed + k``. ``launch.calls`` lists ``(step, steps)`` per launch, ``launch.cells``
    the cells.
    """
    libs = _loaded(libs)
    calls, cells = [], set()
    counter = itertools.count()

    def function(k, dtype_name):
        return _host_function(libs[k.cell], k.persistent_name(dtype_name), 4,
                              table.persistent_params(k))

    def launch(cell, step, name, grid, block, shared, args):
        k = table.kernel(cell, step)
        table.check_persistent_args(k, name, args)
        calls.append((step, args[2]))
        cells.add(cell)
        written = {_span(args[10]), _span(args[5])}  # out, the barrier's counter
        written |= {_span(arr) for a, arr in zip(k.args, args[11::3]) if a.out}
        own = {}
        for arr in args:
            if isinstance(arr, np.ndarray) and _span(arr) not in own:
                own[_span(arr)] = (arr, np.array(arr, copy=True, order="C"))
        flat = [own[_span(v)][1].ctypes.data if isinstance(v, np.ndarray) else v for v in args]
        s = 0 if seed == 0 else seed + next(counter)
        function(k, name)(grid, block, shared, s, *flat)
        for key, (arr, buf) in own.items():
            if key in written:
                arr[...] = buf
            elif buf.tobytes() != arr.tobytes():
                raise AssertionError(f"{cell} {step} persistent: the kernel wrote an input")
        barrier = int(args[5][0])
        steps = args[2]
        if barrier != grid * steps:
            raise AssertionError(f"{cell} {step} persistent: {barrier} arrivals at the grid "
                                 f"barrier, not {grid} blocks x {steps} steps")

    launch.calls, launch.cells = calls, cells
    return launch


#: The emulated device of the persistent kernels: multiprocessors (at most one block each).
EMULATED_SMS = 3
#: Threads per block of the persistent kernels in the emulator (every one a host thread).
PERSISTENT_BLOCK = 16


def host_loops(libs, dtype, *, block=_cuda.BLOCK, seed=1, persistent=False, shared=None,
               occupancy=1, rule=_cuda.PERSISTENT_WHERE_IT_FITS):
    """:class:`xlstm.accel.cuda.Loops` for ``dtype`` on numpy, launching ``libs``' kernels: the
    per-step ones with :func:`host_launch`, and with ``persistent`` the persistent ones with
    :func:`host_persistent_launch` on a device of :data:`EMULATED_SMS` multiprocessors that
    each hold ``occupancy`` blocks and ``shared`` elements of ``dtype`` of shared memory per
    block, wherever ``rule`` (default: every plan that fits) takes them."""
    itemsize = np.dtype(dtype).itemsize
    loops = _cuda.Loops(dtype, mod=np, launch=host_launch(libs, block=block, seed=seed),
                        persistent_launch=host_persistent_launch(libs, seed=seed),
                        device=(EMULATED_SMS, (shared or 0) * itemsize),
                        occupancy=lambda cell, step, name, block, shared: occupancy,
                        block=PERSISTENT_BLOCK)
    loops.persistent = persistent
    loops.rule = rule
    return loops


# ---------------------------------------------------------------- whole sequences
#: (n_x, n_a, n_y, m, T, block, chunk_rows, shared): every grid's last block is partial.
#: ``shared`` is the persistent kernels' shared memory per block, in elements: on
#: :data:`EMULATED_SMS` multiprocessors it makes the last block own fewer units than the
#: others and (except where noted) the product's input come in several tiles of rows.
SEQUENCE_CASES = (
    (3, 5, 4, 6, 7, 8, 4096, 80),  # 30 elements in blocks of 8; units 2, 2, 1
    (3, 5, 4, 6, 7, 8, 12, 80),  # the same, the input term in chunks
    (2, 40, 3, 7, 4, _cuda.BLOCK, 4096, 2700),  # 280 elements in blocks of 256; 14, 14, 12
    (2, 3, 2, 1, 3, 32, 4096, 80),  # 3 elements in one block of 32; one row, one tile
)


def seq_tol(dtype, n_a, gates, T, *, reordered=False):
    """``(rtol, atol)`` between whole sequences of ``T`` steps on two paths (atol relative to
    :func:`scale_of`).

    :data:`SEQ_TOL` covers the rounding of ``tanh``. With ``reordered``, the two paths
    also sum the recurrent products in different orders (the persistent kernels against
    the array path's BLAS, or cuBLAS in two orientations): two orders of a dot product of
    ``K`` terms differ by at most ``2 gamma_K sum |x_k w_k|``, ``gamma_K = K u / (1 - K u)``
    (Higham, Accuracy and Stability of Numerical Algorithms, 3.1), with ``K = gates * n_a``
    the longer of the two products (backward's). Each step adds one such difference, at
    first order, so the bound grows with ``T``; the terms' sum is taken as the scale of the
    results, which holds for the tests' weights of size ``1 / sqrt(n_a)`` and states of
    size 1.
    """
    rtol, atol = SEQ_TOL[dtype]
    if reordered:
        K, u = gates * n_a, float(np.finfo(dtype).eps) / 2
        gap = T * 2 * K * u / (1 - K * u)
        rtol, atol = rtol + gap, atol + gap
    return rtol, atol




def scale_of(arr):
    """``max(1, max |arr|)``: what SEQ_TOL's atol is relative to (a sum of terms of this
    size cancels to a small number with their rounding errors)."""
    return max(1.0, float(np.max(np.abs(arr)))) if arr.size else 1.0


def launches(cell, T):
    """The launches of :func:`api_results` for ``cell`` over ``T`` steps, by kernel step."""
    notebook = cell in ("lstm", "rnn_tanh")
    return {"fwd": (4 if notebook else 2) * T, "bwd": (2 * T - 1) if notebook else T,
            "fwd_masked": 4 * T, "bwd_masked": 2 * T}  # padded: 2 directions


def padded_lengths(m, T):
    """Unsorted lengths of ``m`` sequences padded to ``T``: ``T``, 1, ``T // 2 + 1`` and
    again (every one of them where ``m >= 3``)."""
    return np.array([(T, 1, T // 2 + 1)[b % 3] for b in range(m)])


def api_results(cell, dtype, n_x, n_a, n_y, m, T, seed=3, *, xp=None, asarray=None):
    """One cell's whole sequences through the public API, by name: the model class's
    ``forward`` (with a cache and without) and ``backward`` (with a nonzero gradient on the
    final state), the same for a bidirectional model over a padded batch
    (:func:`padded_lengths`), and for the LSTM and the tanh RNN the notebook's functions (a
    gradient on the first ``T - 1`` steps). Runs whatever loops the engine dispatches to.

    The arrays are numpy's, or ``asarray`` of them and a model in namespace ``xp``.
    """
    import xlstm

    rng = np.random.default_rng(seed)
    conv = (lambda a: a) if asarray is None else asarray

    def draw(*shape, scale=1.0):
        return conv((scale * rng.standard_normal(shape)).astype(dtype))

    from xlstm.models import MODELS

    cls, kwargs = MODELS[cell]  # the model that runs the cell, from the registry
    model = cls(n_x, n_a, xp=xp, dtype=dtype, seed=seed, **kwargs)
    n_s = len(model.cell.state_names)
    x = draw(n_x, m, T)

    def states(k):  # a normaliser positive, as in a valid state
        host = [rng.standard_normal((k, n_a, m)) for _ in range(n_s)]
        return tuple(conv((0.5 + np.abs(h) if s in model.cell.positive else h).astype(dtype))
                     for s, h in zip(model.cell.state_names, host))

    state = states(1)
    dy, dstate = draw(n_a, m, T), tuple(draw(1, n_a, m) for _ in range(n_s))
    y, final, cache = model.forward(x, state)
    y_inf, final_inf, _ = model.forward(x, state, return_cache=False)
    dx, dstate0, (grads,) = model.backward(dy, cache, dstate)
    out = {"y": y, "y (inference)": y_inf, "dx": dx}
    for i in range(n_s):
        out[f"state[{i}]"], out[f"state[{i}] (inference)"] = final[i], final_inf[i]
        out[f"dstate0[{i}]"] = dstate0[i]
    out.update((f"d{k}", v) for k, v in grads.items())
    # a padded batch, both directions: each row's reverse direction starts at its own end
    model = cls(n_x, n_a, bidirectional=True, xp=xp, dtype=dtype,
                seed=seed + 1, **kwargs)
    lengths = conv(padded_lengths(m, T))
    state = states(2)
    dy, dstate = draw(2 * n_a, m, T), tuple(draw(2, n_a, m) for _ in range(n_s))
    y, final, cache = model.forward(x, state, lengths=lengths)
    y_inf, final_inf, _ = model.forward(x, state, lengths=lengths, return_cache=False)
    dx, dstate0, grads = model.backward(dy, cache, dstate)
    out.update({"padded y": y, "padded y (inference)": y_inf, "padded dx": dx})
    for i in range(n_s):
        out[f"padded state[{i}]"] = final[i]
        out[f"padded state[{i}] (inference)"] = final_inf[i]
        out[f"padded dstate0[{i}]"] = dstate0[i]
    out.update((f"padded d{k}[{d}]", v) for d, g in enumerate(grads) for k, v in g.items())
    if cell == "lstm":
        from oracles import random_case

        x, a0, c0, params = random_case(rng, n_x, n_a, n_y, m, T, dtype=dtype)
        x, a0, c0 = conv(x), conv(a0), conv(c0)
        params = {k: conv(v) for k, v in params.items()}
        a, yp, c, caches = xlstm.lstm_forward(x, a0, params, c0)
        inf = xlstm.lstm_forward(x, a0, params, c0, return_caches=False)
        out.update({"a": a, "y_pred": yp, "c": c, "a (inference)": inf[0],
                    "y_pred (inference)": inf[1]})
        out.update(("notebook " + k, v) for k, v in
                   xlstm.lstm_backward(draw(n_a, m, T - 1), caches).items())
    elif cell == "rnn_tanh":
        w = 1.0 / np.sqrt(n_a)  # not saturated: no cancellation of large terms in dx
        params = {"Wax": draw(n_a, n_x, scale=w), "Waa": draw(n_a, n_a, scale=w),
                  "Wya": draw(n_y, n_a, scale=w), "ba": draw(n_a, 1, scale=w),
                  "by": draw(n_y, 1, scale=w)}
        a0 = draw(n_a, m)
        a, yp, caches = xlstm.rnn_forward(x, a0, params)
        inf = xlstm.rnn_forward(x, a0, params, return_caches=False)
        out.update({"a": a, "y_pred": yp, "a (inference)": inf[0], "y_pred (inference)": inf[1]})
        out.update(("notebook " + k, v) for k, v in
                   xlstm.rnn_backward(draw(n_a, m, T - 1), caches).items())
    return out


def run_sequences(libs, dtypes=("float32", "float64"), seeds=(1, 7), cases=SEQUENCE_CASES, *,
                  persistent=False):
    """:func:`api_results` through the host builds ``libs`` (cell -> library) for every
    cell, case, dtype and seed, against the array path; returns the number of sequences
    checked. With ``persistent``, every loop runs as one persistent launch (and the
    tolerance has the reordered products, :func:`seq_tol`); otherwise step by step.

    The results of different seeds (block and thread orders) must agree bit for bit.
    """
    import xlstm
    from xlstm.engine import loop as _engine

    accelerated, chunk = _engine.accelerated_loops, _engine.CHUNK_ROWS
    count = 0
    try:
        for cell, (n_x, n_a, n_y, m, T, block, chunk_rows, shared), dtype in itertools.product(
                libs, cases, dtypes):
            _engine.CHUNK_ROWS = chunk_rows
            _engine.accelerated_loops = accelerated
            with xlstm.accelerators(False):
                want = api_results(cell, dtype, n_x, n_a, n_y, m, T)
            first = None
            gates = table.gates(table.kernel(cell, "fwd"))
            rtol, atol = seq_tol(dtype, n_a, gates, T, reordered=persistent)
            for seed in seeds:
                loops = host_loops(libs, dtype, block=block, seed=seed, persistent=persistent,
                                   shared=shared)
                _engine.accelerated_loops = lambda xp, dt, c=None, loops=loops, **kw: loops
                got = api_results(cell, dtype, n_x, n_a, n_y, m, T)
                calls, whole = loops.launch.calls, loops.persistent_launch.calls
                case = (f"{cell} {dtype} (n_a, m, T)={n_a, m, T} block={block} seed={seed} "
                        f"persistent={persistent}")
                if persistent:  # every loop in one launch, every step in one of them
                    assert not calls and loops.persistent_launch.cells == {cell}, case
                    steps = {k: sum(n for s, n in whole if s == k) for k, _ in whole}
                    assert steps == launches(cell, T), case
                else:
                    assert not whole and loops.launch.cells == {cell}, case
                    assert {k: calls.count(k) for k in set(calls)} == launches(cell, T), case
                assert got.keys() == want.keys(), case
                for key in want:
                    assert got[key].dtype == want[key].dtype, (case, key)
                    np.testing.assert_allclose(got[key], want[key], rtol=rtol,
                                               atol=atol * scale_of(want[key]),
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
        print("usage: python cuda_emulator.py DIR [quick]", file=sys.stderr)
        return 2
    cases = SEQUENCE_CASES[:1] if argv[1:] == ["quick"] else SEQUENCE_CASES
    libs = {}
    for path in sorted(Path(argv[0]).glob("libxlstm_*.so")):
        cell = path.name[len("libxlstm_"):].rsplit("_", 1)[0]
        libs[cell] = path
    # One block order: what ASan checks (every access of every block) does not depend on it;
    # that the orders agree bit for bit is the host tests' (test_cuda.py).
    step = run_sequences(libs, cases=cases, seeds=(1,))
    whole = run_sequences(libs, cases=cases, seeds=(1,), persistent=True)
    print(f"cuda_emulator: {step} sequences of {len(libs)} cells on per-step kernels and "
          f"{whole} on persistent kernels match the array path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
