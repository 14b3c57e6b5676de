"""``python -m xlstm``: the check table, the environment report, and argument errors.

Every bad argument must end in an argparse error (a usage line, one ``error:`` line, exit
status 2, no traceback) before any work starts.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import xlstm
from xlstm import __main__ as cli
from xlstm._lib.compat import BackendUnavailable, load_backend

ROOT = Path(__file__).resolve().parents[1]
#: reStructuredText that must not reach a terminal: ``literals``, :func:`roles`, ``::`` blocks.
RST = re.compile(r"``|:[a-z]+:`|::$", re.M)
TEXT = "the cat sat on the mat. the dog sat on the log. " * 20


def _usage_error(capsys, argv):
    """Run ``main(argv)``; assert an argparse error and return its one error line."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran
    lines = captured.err.splitlines()
    assert len(lines) == 2, captured.err
    assert lines[0].startswith("usage: python -m xlstm")
    assert " error: " in lines[1] and "Traceback" not in captured.err
    return lines[1]


# ------------------------------------------------------------------------------- check
def test_check_passes_on_numpy_and_its_array_path(capsys, monkeypatch):
    monkeypatch.delenv("XLSTM_ACCEL", raising=False)
    assert cli.main(["check", "--backends", "numpy,strict"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "pass" in rows["numpy"] and "pass" in rows["strict"]
    ran = 2
    if importlib.util.find_spec("numba") is not None:  # the compiled loops are the default
        assert "pass" in rows["numpy (array path)"]
        ran = 3
    assert "FAIL" not in out
    assert out.splitlines()[-1] == f"all {ran} checks passed (the chosen backends and paths)"


def test_check_fails_when_a_tolerance_is_missed(capsys, monkeypatch):
    monkeypatch.setattr(cli, "SEED_TOL", 0.0)  # the seed examples match to ~5e-9, not 0
    assert cli.main(["check", "--backends", "numpy"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "passed" not in out
    assert re.search(r"^FAILED: (\d) of \1 checks failed$", out, re.M)


def test_check_covers_the_rnn_api(capsys, monkeypatch):
    """A wrong RNN gradient fails the check in its own column."""
    real = xlstm.rnn_backward

    def off(da, caches):
        return {k: 1.001 * v for k, v in real(da, caches).items()}

    monkeypatch.setattr(xlstm, "rnn_backward", off)
    assert cli.main(["check", "--backends", "strict"]) == 1
    out = capsys.readouterr().out
    head, _, row = out.splitlines()[:3]
    cols = re.split(r"\s{2,}", row.strip())
    assert "rnn gradcheck rel err" in head
    assert cols[0] == "strict" and float(cols[4]) > cli.GRAD_TOL and "FAIL" in cols
    assert float(cols[3]) < cli.GRAD_TOL  # the LSTM's column still passes


def test_check_reports_an_error_as_a_failure(capsys, monkeypatch):
    def broken(xp, device):
        raise RuntimeError("broken backend")

    monkeypatch.setattr(cli, "seed_examples", broken)
    assert cli.main(["check", "--backends", "strict"]) == 1
    out = capsys.readouterr().out
    assert "RuntimeError('broken backend')" in out
    assert out.splitlines()[-1] == "FAILED: 1 of 1 checks failed"


def test_check_with_no_backend_available_fails(capsys, monkeypatch):
    def unavailable(name):
        raise BackendUnavailable(f"{name} is switched off")

    monkeypatch.setattr(cli, "load_backend", unavailable)
    assert cli.main(["check"]) == 1  # no --backends: every backend skips
    out = capsys.readouterr().out
    assert "skip" in out and "passed" not in out
    assert out.splitlines()[-1].startswith("FAILED: no backend ran (numpy, strict,")


def test_check_fails_when_a_named_backend_cannot_run(capsys, monkeypatch):
    def strict_unavailable(name):
        if name == "strict":
            raise BackendUnavailable("strict is switched off")
        return load_backend(name)

    monkeypatch.setattr(cli, "load_backend", strict_unavailable)
    assert cli.main(["check", "--backends", "numpy,strict"]) == 1
    out = capsys.readouterr().out
    assert "strict is switched off" in out
    assert "FAILED: strict (named with --backends) cannot run here;" in out.splitlines()[-1]
    assert "all " not in out


@pytest.mark.parametrize("value", ["nosuch", "numpy,nosuch", "", ","])
def test_check_rejects_bad_backend_names(capsys, value):
    line = _usage_error(capsys, ["check", "--backends", value])
    assert "argument --backends:" in line


# -------------------------------------------------------------------------------- info
def test_info_reports_the_compiled_loops(capsys, monkeypatch):
    monkeypatch.setenv("XLSTM_ACCEL", "0")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"xlstm {xlstm.__version__}\n")
    assert "compiled CPU loops: off (XLSTM_ACCEL=0)" in out


def test_info_names_the_gpu_of_torch_cuda(capsys, monkeypatch):
    """``info`` names each GPU backend that loads, with its device (here a stand-in for
    torch on a CUDA device, so that the line is checked without a GPU)."""
    torch = pytest.importorskip("torch")
    real = cli.load_backend

    def load(name):
        if name in ("torch-cuda", "jax-gpu", "cupy"):
            if name != "torch-cuda":
                raise BackendUnavailable(f"{name}: no GPU in this test")
            return real("torch")[0], "cuda:0"
        return real(name)

    monkeypatch.setattr(cli, "load_backend", load)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stand-in GPU")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch-cuda {torch.__version__}: device cuda:0, Stand-in GPU\n" in out
    assert "jax-gpu: unavailable (jax-gpu: no GPU in this test)" in out


def test_info_install_hint_is_a_working_command(capsys, monkeypatch):
    monkeypatch.delenv("XLSTM_ACCEL", raising=False)
    monkeypatch.setattr(cli._engine, "cpu_loops_module", lambda: (None, "numba is not installed"))
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    hint = re.search(r"compiled CPU loops: off \(numba is not installed: (.*)\)$", out, re.M)
    assert hint is not None, out
    # One shell word per argument: the requirement is quoted against the shell's `>`.
    assert shlex.split(hint.group(1)) == ["python", "-m", "pip", "install", cli.CPU_EXTRA]


def test_info_hint_matches_the_cpu_extra():
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("no pyproject.toml next to the tests")
    extra = re.search(r'^cpu = \["([^"]+)"\]$', pyproject.read_text(encoding="utf-8"), re.M)
    assert extra is not None and extra.group(1) == cli.CPU_EXTRA


# --------------------------------------------------------------------- version and help
def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"xlstm {xlstm.__version__}\n"


@pytest.mark.parametrize("argv", [
    [], ["check"], ["info"], ["demo"], ["demo", "charlm"], ["demo", "adding"],
    ["demo", "bidirectional"], ["demo", "recall"], ["demo", "cells"],
], ids=lambda argv: " ".join(argv) or "top")
def test_help_is_plain_text(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m xlstm")
    assert not RST.search(out), RST.findall(out)
    assert len(out.split("\n\n")[1].strip()) > 20  # a description, not only the options


def test_no_command_is_a_usage_error(capsys):
    assert "arguments are required: {check,info,demo}" in _usage_error(capsys, [])
    assert "invalid choice: 'nosuch'" in _usage_error(capsys, ["nosuch"])
    assert "invalid choice: 'nosuch'" in _usage_error(capsys, ["demo", "nosuch"])


# ------------------------------------------------------------------ demo argument errors
@pytest.mark.parametrize("args, where", [
    (["adding", "--T", "-1"], "--T"),
    (["adding", "--T", "1"], "--T"),
    (["adding", "--steps", "0"], "--steps"),
    (["charlm", "--steps", "0"], "--steps"),
    (["charlm", "--steps", "1.5"], "--steps"),
    (["charlm", "--hidden", "x"], "--hidden"),
    (["charlm", "--seq-len", "0"], "--seq-len"),
    (["charlm", "--batch", "-2"], "--batch"),
    (["charlm", "--layers", "0"], "--layers"),
    (["charlm", "--layers", "x"], "--layers"),
    (["charlm", "--layers", "1.5"], "--layers"),
    (["charlm", "--sample-every", "-1"], "--sample-every"),
    (["charlm", "--temperature", "0"], "--temperature"),
    (["adding", "--lr", "0"], "--lr"),
    (["adding", "--lr", "nan"], "--lr"),
    (["adding", "--clip", "-1"], "--clip"),
    (["adding", "--target", "inf"], "--target"),
    (["adding", "--eval-every", "0"], "--eval-every"),
    (["adding", "--test-size", "0"], "--test-size"),
    (["adding", "--seed", "-1"], "--seed"),
    (["adding", "--backend", "nosuch"], "--backend"),
    (["adding", "--dtype", "float16"], "--dtype"),
    (["charlm", "--text", "missing.txt"], "--text"),
    (["charlm", "--text", "."], "--text"),
    (["adding", "--out", "no/such/folder/p.npz"], "--out"),
    (["adding", "--out", "."], "--out"),
    (["adding", "--out", ""], "--out"),
    (["charlm", "--plot", "no/such/folder/loss.png"], "--plot"),
])
def test_demo_argument_errors(capsys, monkeypatch, tmp_path, args, where):
    monkeypatch.chdir(tmp_path)
    line = _usage_error(capsys, ["demo", *args])
    assert line.startswith(f"python -m xlstm demo {args[0]}: error: argument {where}:")
    assert not list(tmp_path.iterdir())  # nothing written


def test_demo_out_inside_a_file_is_an_error(capsys, tmp_path):
    (tmp_path / "file").write_text("x", encoding="utf-8")
    line = _usage_error(capsys, ["demo", "adding", "--out", str(tmp_path / "file" / "p.npz")])
    assert "does not exist" in line


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="needs a user whom file permissions bind (not root)")
def test_demo_out_in_a_read_only_folder_is_an_error(capsys, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        line = _usage_error(capsys, ["demo", "adding", "--out", str(folder / "p.npz")])
    finally:
        folder.chmod(0o700)
    assert "cannot write in the folder" in line


def test_demo_text_that_cannot_serve_is_an_error(capsys, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abcabc", encoding="utf-8")
    line = _usage_error(capsys, ["demo", "charlm", "--text", str(short), "--seq-len", "10"])
    assert "argument --seq-len: does not fit the text: it has 6 characters" in line
    same = tmp_path / "same.txt"
    same.write_text("a" * 500, encoding="utf-8")
    line = _usage_error(capsys, ["demo", "charlm", "--text", str(same)])
    assert "argument --text: needs at least two distinct characters" in line
    fine = tmp_path / "fine.txt"
    fine.write_text("abcdefghij" * 100, encoding="utf-8")
    line = _usage_error(capsys, ["demo", "charlm", "--text", str(fine), "--batch", "100"])
    assert "argument --batch: does not fit the text: it has 1000 characters; after the 100 " \
           "held out, 900" in line
    assert "fewer than batch=100 streams of seq_len + 1 = 51 characters need (5100)" in line
    # the default text too
    line = _usage_error(capsys, ["demo", "charlm", "--batch", "100000000"])
    assert "argument --batch: does not fit the text" in line
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\xfa" * 100)
    assert "is not UTF-8 text" in _usage_error(capsys, ["demo", "charlm", "--text", str(binary)])


def test_demo_backend_that_cannot_run_is_an_error(capsys, monkeypatch):
    from xlstm import demos

    def unavailable(name):
        raise BackendUnavailable(f"{name} is switched off")

    monkeypatch.setattr(demos, "load_backend", unavailable)
    line = _usage_error(capsys, ["demo", "adding", "--backend", "torch"])
    assert line.endswith("error: argument --backend: torch is switched off")


@pytest.fixture
def memory_16gib(monkeypatch):
    """The demos' memory checks see a machine of 16 GiB, whatever this one has."""
    from xlstm.demos import _run

    monkeypatch.setattr(_run, "memory_bytes", lambda: 16 * 2**30)


@pytest.mark.parametrize("args, where, says", [
    (["recall", "--keys", "1"], "--keys", "must be an int >= 4 (a distinct key for each"),
    (["recall", "--pairs", "9"], "--keys", "must be an int >= 9"),
    (["charlm", "--cell", "mlstm", "--hidden", "3"], "--hidden",
     "must be a multiple of 2 (the mLSTM splits it among 2 heads), got 3; try 2"),
    (["charlm", "--cell", "slstm", "--hidden", "5"], "--hidden", "must be a multiple of 2"),
    (["charlm", "--hidden", "100000"], "--hidden", "is too large: a 2-layer LSTM"),
    (["charlm", "--cell", "mlstm", "--hidden", "1000000"], "--hidden", "is too large"),
    (["cells", "--hidden", "100000"], "--hidden", "is too large"),
    (["adding", "--hidden", "1000000"], "--hidden", "is too large"),
    (["adding", "--T", "1000000000"], "--T", "is too large"),
    (["adding", "--test-size", "1000000000"], "--test-size", "is too large"),
    (["bidirectional", "--batch", "1000000000"], "--batch", "is too large"),
    (["bidirectional", "--vocab", "1000000000"], "--vocab", "is too large"),
    (["recall", "--keys", "1000000000"], "--keys", "is too large"),
    (["recall", "--pairs", "100000000", "--keys", "100000000"], "--pairs", "is too large"),
    (["cells", "--out-dir", "no/such"], "--out-dir",
     "must be an existing folder; 'no/such' does not exist"),
    (["charlm", "--text", os.devnull], "--text", "is not a regular file"),
    (["cells", "--text", os.devnull], "--text", "is not a regular file"),
])
def test_demo_errors_that_the_demo_finds(capsys, monkeypatch, tmp_path, memory_16gib, args,
                                         where, says):
    """Values that only the demo can judge (against another value, the heads of a cell, the
    machine's memory, the file system) are argparse errors too, found before anything is
    allocated, trained or written."""
    monkeypatch.chdir(tmp_path)
    line = _usage_error(capsys, ["demo", *args])
    assert line.startswith(f"python -m xlstm demo {args[0]}: error: argument {where}: ")
    assert says in line
    assert not list(tmp_path.iterdir())


def test_demo_out_dir_that_is_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("x", encoding="utf-8")
    line = _usage_error(capsys, ["demo", "cells", "--out-dir", str(tmp_path / "file")])
    assert "argument --out-dir: must be an existing folder" in line and "is a file" in line


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_demo_text_that_is_a_pipe_is_refused_without_waiting(capsys, tmp_path):
    """Opening a pipe for reading waits for a writer: it is refused before it is opened."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    line = _usage_error(capsys, ["demo", "charlm", "--text", str(fifo)])
    assert f"argument --text: {str(fifo)!r} is not a regular file" in line


def test_demo_without_a_name_names_only_what_is_missing(capsys):
    line = _usage_error(capsys, ["demo"])
    assert line.endswith("error: the following arguments are required: NAME")


#: Every subcommand's usage line: the options a user types, no internal names.
USAGE = {
    (): "usage: python -m xlstm [-h] [--version] {check,info,demo} ...",
    ("check",): "usage: python -m xlstm check [-h] [--backends NAMES]",
    ("info",): "usage: python -m xlstm info [-h]",
    ("demo",): "usage: python -m xlstm demo [-h] NAME ...",
    **{("demo", name): f"usage: python -m xlstm demo {name} [options]"
       for name in ("charlm", "adding", "bidirectional", "recall", "cells")},
}
#: The names that the parsers keep to themselves.
INTERNAL = re.compile(r"demo_args|demo_parser|command_parser|\bfunc\b|\bcommand\b")


@pytest.mark.parametrize("argv", list(USAGE), ids=lambda argv: " ".join(argv) or "top")
def test_usage_lines_show_no_internal_names(capsys, argv):
    """The usage line of ``--help`` and of an error is the same, and names only options."""
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == USAGE[argv]
    assert not INTERNAL.search(out), INTERNAL.findall(out)
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--no-such-option"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == USAGE[argv]
    assert not INTERNAL.search(err), err


@pytest.mark.parametrize("argv, usage", [
    (["check", "extra"], ("check",)),
    (["info", "extra"], ("info",)),
    (["demo", "adding", "extra"], ("demo", "adding")),
    (["demo", "recall", "--steps", "5", "--nosuch", "1"], ("demo", "recall")),
])
def test_unrecognized_arguments_are_the_error_of_their_subcommand(capsys, tmp_path,
                                                                   monkeypatch, argv, usage):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    first, line = captured.err.splitlines()
    prog = USAGE[usage].removeprefix("usage: ").split(" [")[0]
    assert first == USAGE[usage]
    assert line.startswith(f"{prog}: error: unrecognized arguments: ")
    assert not list(tmp_path.iterdir())


def test_the_command_name_follows_how_it_was_run(capsys, monkeypatch):
    """``xlstm`` as the installed command (its usage lines say so), else ``python -m xlstm``."""
    for argv0, prog in (("/usr/bin/xlstm", "xlstm"), ("venv/Scripts/xlstm.exe", "xlstm"),
                        ("/src/xlstm/__main__.py", "python -m xlstm"),
                        ("/src/xlstm.py", "python -m xlstm"), ("", "python -m xlstm")):
        monkeypatch.setattr(sys, "argv", [argv0])
        assert cli.program_name() == prog, argv0
    with pytest.raises(SystemExit):
        cli.main(["demo", "cells", "--steps", "0"], prog="xlstm")
    assert capsys.readouterr().err.splitlines() == [
        "usage: xlstm demo cells [options]",
        "xlstm demo cells: error: argument --steps: must be an integer >= 1, got 0"]


@pytest.mark.parametrize("argv", [
    ["demo"],
    ["demo", "recall", "--keys", "1"],
    ["demo", "charlm", "--cell", "mlstm", "--hidden", "3"],
    ["demo", "cells", "--out-dir", "no/such"],
    ["demo", "charlm", "--text", os.devnull],
    ["demo", "adding", "--T", "-1"],
    ["demo", "charlm", "--text", "missing.txt"],
    ["check", "--backends", "nosuch"],
])
def test_errors_from_the_real_command_line(tmp_path, argv):
    """The same through ``python -m xlstm`` in a fresh process: exit 2, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(Path(xlstm.__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "xlstm", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage: ") and " error: " in lines[1]
    assert not list(tmp_path.iterdir())


def test_version_from_the_real_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(xlstm.__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "xlstm", "--version"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == f"xlstm {xlstm.__version__}\n"


# ------------------------------------------------- the test suite's XLSTM_BACKENDS switch
def _pytest(tmp_path, backends, *args):
    env = {k: v for k, v in os.environ.items() if k != "XLSTM_BACKENDS"}
    env["PYTHONPATH"] = str(Path(xlstm.__file__).resolve().parents[1])
    if backends is not None:
        env["XLSTM_BACKENDS"] = backends
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only",
         "--rootdir", str(ROOT), str(ROOT / "tests" / "test_activations.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_named_backend_that_cannot_run_fails_the_run(tmp_path):
    try:
        load_backend("cupy")
    except BackendUnavailable as exc:
        reason = str(exc)
    else:
        pytest.skip("cupy runs here")
    proc = _pytest(tmp_path, "numpy,cupy")
    assert proc.returncode == 4, proc.stdout + proc.stderr  # pytest's usage error
    assert f"cannot run here: cupy: {reason}" in proc.stderr
    proc = _pytest(tmp_path, "nosuch")
    assert proc.returncode == 4 and "unknown names ['nosuch']" in proc.stderr


def test_without_the_switch_the_header_names_every_backend(tmp_path, backends_run):
    proc = _pytest(tmp_path, None)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = [ln for ln in proc.stdout.splitlines() if ln.startswith("xlstm backends")]
    assert len(header) == 1
    assert header[0].startswith("xlstm backends (every one that loads here): ")
    for name in cli.BACKENDS:
        try:
            load_backend(name)
        except BackendUnavailable as exc:
            assert f"{name} ({exc})" in header[0]  # named with its reason
            assert f"[{name}-" not in proc.stdout and f"[{name}]" not in proc.stdout
        else:
            assert f"[{name}]" in proc.stdout or f"[{name}-" in proc.stdout
    if os.environ.get("XLSTM_BACKENDS", "").strip() == "":
        assert set(backends_run) == {n for n in cli.BACKENDS if f"[{n}" in proc.stdout}
