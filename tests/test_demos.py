"""The demos, with tiny settings: they run, learn, save, and are reproducible."""

from __future__ import annotations

import fnmatch
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xlstm
from xlstm import demos, load_params
from xlstm.__main__ import main as cli_main
from xlstm.demos import char_lm

TINY_CHARLM = ["--steps", "4", "--hidden", "8", "--seq-len", "12", "--batch", "4",
               "--sample-every", "2", "--sample-len", "15", "--no-progress"]
TINY_ADDING = ["--T", "6", "--steps", "6", "--hidden", "4", "--batch", "8", "--eval-every", "3",
               "--test-size", "16", "--no-progress"]
TEXT = "the cat sat on the mat. the dog sat on the log. " * 20


def _finite(result, *keys):
    for k in keys:
        assert math.isfinite(result[k]), (k, result[k])
    assert all(math.isfinite(v) for v in result["history"])


def test_charlm_tiny_on_the_default_corpus(tmp_path, capsys):
    out = tmp_path / "lm.npz"
    res = demos.main(["charlm", *TINY_CHARLM, "--out", str(out)])
    _finite(res, "initial_loss", "final_loss", "train_loss_first", "train_loss_last")
    assert res["steps"] == 4 and len(res["history"]) == 4
    assert res["baseline"] == pytest.approx(math.log(res["vocab_size"]))
    assert res["vocab_size"] > 50  # English documentation text
    assert abs(res["initial_loss"] - res["baseline"]) < 0.5  # an untrained model is near uniform
    assert len(res["sample"]) == 15
    assert [s for s, _ in res["evals"]] == [0, 2, 4]
    params = load_params(out)  # the tree {"rnn": <2-layer LSTM params>, "head": ...}
    V = res["vocab_size"]
    assert list(params) == ["rnn", "head"] and len(params["rnn"]) == 2  # two layers by default
    assert params["rnn"][0]["Wf"].shape == (8, 8 + V)
    assert params["rnn"][1]["Wf"].shape == (8, 8 + 8)
    assert params["head"]["Wy"].shape == (V, 8) and params["head"]["by"].shape == (V, 1)
    assert params["rnn"][0]["Wf"].dtype == np.float32
    if res["plot_path"] is not None:
        assert res["plot_path"] == str(tmp_path / "lm_loss.png")
        assert (tmp_path / "lm_loss.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "held-out loss before training" in printed and "sample at step 2" in printed


def test_charlm_learns_a_small_text_and_is_reproducible(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")

    def run(name, **kw):
        kw = {"steps": 60, "hidden": 16, "seq_len": 16, "batch": 8, "lr": 2e-2, **kw}
        return demos.charlm(text=path, sample_every=0, sample_len=20, out=tmp_path / name,
                            plot=False, progress=False, verbose=False, **kw)

    a, b = run("a.npz"), run("b.npz")
    assert a["vocab_size"] == len(set(TEXT))
    assert a["final_loss"] < 0.6 * a["initial_loss"]
    assert a["train_loss_last"] < a["train_loss_first"]
    assert a["plot_path"] is None and not list(tmp_path.glob("*.png"))
    assert a["history"] == b["history"] and a["sample"] == b["sample"]
    pa, pb = load_params(tmp_path / "a.npz"), load_params(tmp_path / "b.npz")
    flat_a, flat_b = xlstm._lib.tree.flatten(pa), xlstm._lib.tree.flatten(pb)
    assert list(flat_a) == list(flat_b) and len(pa["rnn"]) == 2
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k])
    # the saved tree samples text of the vocabulary, the same for the same generator
    vocab = sorted(set(TEXT))
    one = demos.sample(pa, vocab, 40, prime="the ", rng=np.random.default_rng(3))
    assert one == demos.sample(pb, vocab, 40, prime="the ", rng=np.random.default_rng(3))
    assert len(one) == 40 and set(one) <= set(vocab)
    # --layers: three stacked layers learn too, and the file says so
    c = run("c.npz", layers=3, steps=120)
    assert c["final_loss"] < 0.6 * c["initial_loss"]
    pc = load_params(tmp_path / "c.npz")
    assert len(pc["rnn"]) == 3 and pc["rnn"][2]["Wf"].shape == (16, 32)
    assert len(demos.sample(pc, vocab, 5)) == 5


def lm_tree(V, n_a, layers, dtype=np.float64, seed=0):
    """A charlm tree: an LSTM's params and a linear head."""
    rng = np.random.default_rng(seed)
    model = xlstm.LSTM(V, n_a, num_layers=layers, dtype=dtype, seed=seed)
    head = {"Wy": rng.standard_normal((V, n_a)).astype(dtype),
            "by": rng.standard_normal((V, 1)).astype(dtype)}
    return {"rnn": model.params, "head": head}


def test_sample_is_seeded_and_checks_its_prime():
    vocab = list("abc")
    params = lm_tree(3, 4, 2)
    one = demos.sample(params, vocab, 30, prime="ab", rng=np.random.default_rng(5))
    two = demos.sample(params, vocab, 30, prime="ab", rng=np.random.default_rng(5))
    assert one == two and len(one) == 30 and set(one) <= set(vocab)
    cold = demos.sample(params, vocab, 30, prime="a", temperature=0.01,
                        rng=np.random.default_rng(1))
    assert len(set(cold)) <= 2  # almost greedy
    with pytest.raises(ValueError, match="outside the vocabulary"):
        demos.sample(params, vocab, 3, prime="abz")
    with pytest.raises(ValueError, match="temperature"):
        demos.sample(params, vocab, 3, temperature=0.0)


def test_sample_runs_the_tree_one_character_per_call_with_the_state_carried():
    """The layers and sizes come from the tree; each character is one forward call of one
    step from the state the previous call ended in, so the draws follow the model run over
    the whole text in one call."""
    vocab = list("abcd")
    for layers in (1, 3):
        params = lm_tree(4, 5, layers, seed=layers)
        text = demos.sample(params, vocab, 12, prime="ab", rng=np.random.default_rng(0))
        model = xlstm.LSTM(4, 5, num_layers=layers, dtype="float64")
        ids = [vocab.index(ch) for ch in "ab" + text]
        x = np.eye(4)[:, ids][:, None, :]
        y, _, _ = model.forward(x, params=params["rnn"], return_cache=False)
        logits = params["head"]["Wy"] @ y[:, 0, :] + params["head"]["by"]  # (V, T)
        # replay the draws: the same generator, the probabilities of the one-call run
        rng = np.random.default_rng(0)
        for t in range(len(text)):
            z = logits[:, t + 1]
            p = np.exp(z - z.max())
            assert vocab[int(rng.choice(4, p=p / p.sum()))] == text[t]


def test_sample_refuses_params_that_are_not_its_tree():
    vocab = list("abc")
    with pytest.raises(TypeError, match=r"params must be the dict .*'rnn'"):
        demos.sample(xlstm.init_params(3, 4, 3, seed=0), vocab, 3)
    tree = lm_tree(3, 4, 2)
    with pytest.raises(TypeError, match=r"params\['head'\]"):
        demos.sample({"rnn": tree["rnn"], "head": {"Wy": tree["head"]["Wy"]}}, vocab, 3)
    with pytest.raises(ValueError, match=r"params\['rnn'\]\[0\]\['Wf'\] must have shape "
                                         r"\(n_a, n_a \+ 4\)"):
        demos.sample(tree, vocab + ["d"], 3)
    with pytest.raises(ValueError, match=r"params\['head'\]\['Wy'\] must have shape \(3, 4\)"):
        demos.sample({**tree, "head": {**tree["head"], "Wy": np.zeros((3, 5))}}, vocab, 3)


def test_charlm_reads_contiguous_streams_and_carries_the_state(tmp_path, monkeypatch):
    """Truncated backpropagation through time: chunk k + 1 of every stream goes on where
    chunk k ended, and starts from the final state of chunk k, except the first chunk of
    every pass over the streams, which starts from zeros."""
    xp = xlstm._lib.compat.default_namespace()  # plain numpy 1.26 takes no device
    n_chunks, chunk = char_lm._chunks(np.arange(103), 4, 5, 103, xp.float64, xp=xp, device="cpu")
    assert n_chunks == (103 // 4 - 1) // 5 == 4  # streams of 25 characters: 4 chunks of 5 + 1
    for k in range(n_chunks):
        x, labels = chunk(k)
        assert x.shape == (103, 4, 5) and labels.shape == (4, 5)
        ids = np.argmax(x, axis=0)
        want = np.arange(4)[:, None] * 25 + k * 5 + np.arange(5)
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_array_equal(labels, want + 1)

    calls = []
    real = char_lm.head_loss

    def spy(model, params, x, labels, *, state=None, **kw):
        loss, grads, final = real(model, params, x, labels, state=state, **kw)
        calls.append((state, final))
        return loss, grads, final

    monkeypatch.setattr(char_lm, "head_loss", spy)
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    # 882 training characters in 8 streams of 110: 6 chunks of 16 per pass
    demos.charlm(text=path, steps=14, hidden=4, seq_len=16, batch=8, sample_every=0,
                 sample_len=0, out=tmp_path / "p.npz", plot=False, progress=False,
                 verbose=False)
    assert len(calls) == 14
    for step, (state, _) in enumerate(calls):
        if step % 6 == 0:
            assert state is None
        else:
            assert state is calls[step - 1][1]
            assert state[0].shape == state[1].shape == (2, 4, 8)  # (layers, n_a, streams)


def test_adding_tiny(tmp_path, capsys):
    out = tmp_path / "add.npz"
    res = demos.main(["adding", *TINY_ADDING, "--out", str(out)])
    _finite(res, "initial_loss", "final_loss", "baseline", "train_loss_first",
            "train_loss_last")
    assert res["steps"] == 6
    assert [s for s, _ in res["evals"]] == [0, 3, 6]
    assert 0.05 < res["baseline"] < 0.4  # 1/6 in expectation
    params = load_params(out)
    assert params["Wy"].shape == (1, 4) and params["Wf"].shape == (4, 6)
    if res["plot_path"] is not None:
        assert (tmp_path / "add_loss.png").exists()
    assert "test MSE before training" in capsys.readouterr().out


def test_adding_learns(tmp_path):
    """A short T: the test error falls far below the always-1.0 baseline within seconds."""
    res = demos.adding(T=20, hidden=16, batch=32, steps=600, eval_every=50, test_size=200,
                       out=tmp_path / "p.npz", plot=False, progress=False, verbose=False)
    assert res["train_loss_last"] < 0.2 * res["train_loss_first"]
    assert res["final_loss"] < 0.2 * res["baseline"]
    assert res["final_loss"] < res["initial_loss"]
    assert res["solved"] == (res["final_loss"] < 0.01)
    assert res["seconds"] < 30


def test_adding_is_reproducible(tmp_path):
    kw = {"T": 8, "hidden": 6, "batch": 8, "steps": 10, "eval_every": 5, "test_size": 32,
          "plot": False, "progress": False, "verbose": False}
    a = demos.adding(out=tmp_path / "a.npz", **kw)
    b = demos.adding(out=tmp_path / "b.npz", **kw)
    assert a["history"] == b["history"] and a["evals"] == b["evals"]


def test_adding_data_marks_one_position_per_half():
    x, y = demos.adding_data(50, 10, np.random.default_rng(0))
    assert x.shape == (2, 50, 10) and y.shape == (1, 50)
    markers = x[1]
    assert np.all(markers.sum(axis=1) == 2)
    assert np.all(markers[:, :5].sum(axis=1) == 1)
    np.testing.assert_allclose(y[0], np.sum(x[0] * markers, axis=1))


@pytest.mark.parametrize("backend", ["strict-device1", "torch"])
def test_demos_on_other_backends(backend, backends_run, tmp_path):
    if backend not in backends_run:
        pytest.skip(f"{backend} is not among this run's backends ({', '.join(backends_run)})")
    common = ["--backend", backend, "--dtype", "float64", "--quiet", "--no-plot"]
    res = demos.main(["adding", *TINY_ADDING, *common, "--out", str(tmp_path / "a.npz")])
    ref = demos.main(["adding", *TINY_ADDING, "--dtype", "float64", "--quiet", "--no-plot",
                      "--out", str(tmp_path / "ref.npz")])
    np.testing.assert_allclose(res["history"], ref["history"], rtol=1e-9)
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    res = demos.main(["charlm", *TINY_CHARLM, *common, "--text", str(path),
                      "--out", str(tmp_path / "c.npz")])
    _finite(res, "initial_loss", "final_loss")
    ref = demos.main(["charlm", *TINY_CHARLM, "--dtype", "float64", "--quiet", "--no-plot",
                      "--text", str(path), "--out", str(tmp_path / "c_ref.npz")])
    np.testing.assert_allclose(res["history"], ref["history"], rtol=1e-9)
    assert load_params(tmp_path / "c.npz")["rnn"][0]["Wf"].dtype == np.float64
    tiny = ["--T", "6", "--steps", "4", "--test-size", "8", "--no-progress"]
    res = demos.main(["bidirectional", *tiny, *common])
    ref = demos.main(["bidirectional", *tiny, "--dtype", "float64", "--quiet", "--no-plot"])
    for name, history in ref["history"].items():
        np.testing.assert_allclose(res["history"][name], history, rtol=1e-9)


def test_cli_demo_subcommand(tmp_path, capsys):
    code = cli_main(["demo", "adding", *TINY_ADDING, "--quiet", "--no-plot",
                     "--out", str(tmp_path / "p.npz")])
    assert code == 1  # six steps do not solve it, and the exit code says so
    assert (tmp_path / "p.npz").exists()
    code = cli_main(["demo", "adding", *TINY_ADDING, "--quiet", "--no-plot", "--target", "10",
                     "--out", str(tmp_path / "q.npz")])
    assert code == 0
    with pytest.raises(SystemExit):
        cli_main(["demo", "nosuchdemo"])
    with pytest.raises(SystemExit):
        cli_main(["demo", "charlm", "--help"])
    assert "--seq-len" in capsys.readouterr().out


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="eval_every"):
        demos.adding(eval_every=0, out=tmp_path / "p.npz", verbose=False)
    with pytest.raises(ValueError, match="T must be"):
        demos.adding(T=1, out=tmp_path / "p.npz", verbose=False)
    short = tmp_path / "short.txt"
    short.write_text("abcabc", encoding="utf-8")
    with pytest.raises(ValueError, match="characters"):
        demos.charlm(text=short, seq_len=10, out=tmp_path / "p.npz", verbose=False)
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    with pytest.raises(ValueError, match=r"fewer than batch=100 streams of seq_len \+ 1 = 11"):
        demos.charlm(text=text, seq_len=10, batch=100, out=tmp_path / "p.npz", verbose=False)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="layers must be an int >= 1"):
            demos.charlm(layers=bad, out=tmp_path / "p.npz", verbose=False)
    assert not list(tmp_path.glob("*.npz"))


@pytest.fixture
def no_training(monkeypatch):
    """Every demo's training loop fails the test: what is checked must be checked first."""
    def fit(*args, **kwargs):
        raise AssertionError("the demo started training")

    for name in ("char_lm", "adding_problem", "bidirectional", "recall"):
        monkeypatch.setattr(sys.modules[f"xlstm.demos.{name}"], "fit", fit)


def test_the_python_api_checks_before_training(tmp_path, monkeypatch, no_training):
    """The demos as functions refuse what would fail at the end, or could never run, before
    the first step, with an ``ArgumentError`` (a ValueError) that names the argument."""
    from xlstm.demos import _run

    monkeypatch.setattr(_run, "memory_bytes", lambda: 16 * 2**30)
    missing = tmp_path / "none"
    cases = [
        (demos.charlm_cells, {"out_dir": missing}, "out_dir must be an existing folder"),
        (demos.charlm_cells, {"cells": ("lstm", "gru")}, "cells must name cells of"),
        (demos.charlm_cells, {"hidden": 10**5}, "hidden is too large"),
        (demos.charlm, {"out": missing / "p.npz"}, "out cannot be written: the folder"),
        (demos.charlm, {"plot": missing / "loss.png"}, "plot cannot be written"),
        (demos.charlm, {"cell": "mlstm", "hidden": 3}, "hidden must be a multiple of 2"),
        (demos.charlm, {"cell": "gru"}, "cell must be one of"),
        (demos.charlm, {"hidden": 10**5}, "hidden is too large: a 2-layer LSTM"),
        (demos.charlm, {"text": os.devnull}, "text '/dev/null' is not a regular file"),
        (demos.adding, {"out": missing / "p.npz"}, "out cannot be written"),
        (demos.adding, {"hidden": 10**6}, "hidden is too large"),
        (demos.bidirectional, {"plot": missing / "b.png"}, "plot cannot be written"),
        (demos.bidirectional, {"T": 10**9}, "T is too large"),
        (demos.recall, {"keys": 2, "pairs": 3}, "keys must be an int >= 3"),
        (demos.recall, {"plot": missing / "r.png"}, "plot cannot be written"),
        (demos.recall, {"test_size": 10**9}, "test_size is too large"),
    ]
    for demo, kwargs, says in cases:
        # paths that would be fine, unless the case names others
        fine = ({"out": tmp_path / "p.npz"} if demo in (demos.charlm, demos.adding)
                else {"plot": tmp_path / "x.png"})
        with pytest.raises(demos.ArgumentError, match=says) as info:
            demo(verbose=False, **{**fine, **kwargs})
        assert isinstance(info.value, ValueError) and says.startswith(info.value.name)
    assert not list(tmp_path.iterdir())


def test_load_corpus_reads_regular_files_only(tmp_path):
    """Only a regular file is opened, and read in one read of its size; line ends as in
    Python's text mode."""
    path = tmp_path / "t.txt"
    path.write_bytes("ab\r\ncd\ref\n\u00e9".encode())
    assert demos.load_corpus(path) == "ab\ncd\nef\n\u00e9"
    with pytest.raises(demos.ArgumentError, match="text '/dev/zero' is not a regular file"):
        demos.load_corpus("/dev/zero" if os.path.exists("/dev/zero") else os.devnull)
    with pytest.raises(demos.ArgumentError, match="is a folder"):
        demos.load_corpus(tmp_path)
    with pytest.raises(demos.ArgumentError, match="does not exist"):
        demos.load_corpus(tmp_path / "none.txt")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(demos.ArgumentError, match="not a regular file"):
            demos.load_corpus(tmp_path / "fifo")


def test_no_plot_without_matplotlib(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    res = demos.main(["adding", *TINY_ADDING, "--quiet", "--out", str(tmp_path / "p.npz")])
    assert res["plot_path"] is None
    assert (tmp_path / "p.npz").exists() and not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("name", ["charlm", "adding"])
def test_output_paths_are_checked_before_training(name, tmp_path, capsys):
    """A folder that does not exist is a usage error before any work, not after training."""
    for option, path in (("--out", tmp_path / "none" / "p.npz"),
                         ("--plot", tmp_path / "none" / "loss.png")):
        with pytest.raises(SystemExit) as info:
            demos.main([name, "--steps", "1", option, str(path)])
        assert info.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # no setup line: nothing was loaded or trained
        assert f"error: argument {option}: the folder" in captured.err
    assert not list(tmp_path.iterdir())


def test_command_line_entry_points_check_their_arguments(capsys):
    for entry in (demos.charlm_main, demos.adding_main):
        with pytest.raises(SystemExit) as info:
            entry(["--steps", "0"])
        assert info.value.code == 2
        assert "argument --steps: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_demos_run_as_a_module(tmp_path):
    """``python -m xlstm.demos NAME`` runs the demo, as ``python -m xlstm demo NAME`` does."""
    env = {**os.environ, "PYTHONPATH": str(Path(xlstm.__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "xlstm.demos", "adding", *TINY_ADDING, "--quiet",
                           "--no-plot", "--out", "p.npz"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # --quiet
    assert load_params(tmp_path / "p.npz")["Wf"].shape == (4, 6)


def test_bidirectional_beats_one_direction_on_the_next_symbol(tmp_path, capsys):
    """Only the reverse direction sees the next symbol: the bidirectional model labels the
    held-out steps far better than blind guessing, the one-direction model does not; the
    plot and the command line work."""
    res = demos.main(["bidirectional", "--T", "10", "--vocab", "3", "--hidden", "8",
                      "--steps", "150", "--test-size", "128", "--no-progress",
                      "--plot", str(tmp_path / "b.png")])
    acc = res["accuracy"]
    assert acc["bidirectional"] > 0.9, acc
    assert acc["one direction"] < res["guess"] + 0.15, acc
    assert "held-out accuracy" in capsys.readouterr().out
    if res["plot_path"] is not None:  # matplotlib is installed
        assert (tmp_path / "b.png").stat().st_size > 0
    again = demos.bidirectional(T=10, vocab=3, hidden=8, steps=5, test_size=16, plot=False,
                                progress=False, verbose=False)
    same = demos.bidirectional(T=10, vocab=3, hidden=8, steps=5, test_size=16, plot=False,
                               progress=False, verbose=False)
    assert again["history"] == same["history"]  # seeded: reproducible


def test_next_symbol_data_labels_the_next_symbol_within_each_length():
    x, labels, lengths = demos.next_symbol_data(50, 9, 4, np.random.default_rng(0))
    assert x.shape == (4, 50, 9) and labels.shape == (50, 9)
    assert lengths.min() >= 4 and lengths.max() <= 9
    for b in range(50):
        n = lengths[b]
        sym = np.argmax(x[:, b, :n], axis=0)
        np.testing.assert_array_equal(labels[b, : n - 1], sym[1:])
        assert labels[b, n - 1] == 4 and np.all(x[:, b, n:] == 0) and np.all(labels[b, n:] == 0)


def test_recall_data_pairs_every_query_with_its_value():
    rng = np.random.default_rng(0)
    pairs, queries, keys, values = 3, 5, 4, 6
    x, labels, mask = demos.recall_data(7, pairs, queries, keys, values, rng)
    n_sym, T = keys + values, 2 * pairs + queries
    assert x.shape == (2 * n_sym, 7, T) and labels.shape == mask.shape == (7, T)
    sym = np.argmax(x[:n_sym], axis=0)  # every step holds one symbol ...
    assert np.all(x[:n_sym].sum(axis=0) == 1)
    np.testing.assert_array_equal(x[n_sym:, :, 1:], x[:n_sym, :, :-1])  # ... and the one before
    assert not x[n_sym:, :, 0].any()
    for r in range(7):
        k, v = sym[r, 0 : 2 * pairs : 2], sym[r, 1 : 2 * pairs : 2] - keys
        assert len(set(k)) == pairs and np.all(k < keys) and np.all((v >= 0) & (v < values))
        table = dict(zip(k, v))
        for t in range(2 * pairs, T):
            assert mask[r, t] and labels[r, t] == table[sym[r, t]]
        assert not mask[r, : 2 * pairs].any()


def test_recall_demo_runs_every_xlstm_cell_at_equal_size(tmp_path, capsys):
    """The three models, each with the largest hidden size whose parameters do not exceed
    the LSTM's, trained and scored; seeded, so a second run repeats the first."""
    args = ["recall", "--pairs", "2", "--queries", "2", "--keys", "3", "--values", "3",
            "--hidden", "8", "--steps", "5", "--test-size", "16", "--no-progress"]
    res = demos.main([*args, "--plot", str(tmp_path / "r.png")])
    assert set(res["accuracy"]) == {"LSTM", "sLSTM", "mLSTM"}
    budget = res["parameters"]["LSTM"]
    for name, count in res["parameters"].items():
        assert 0.75 * budget <= count <= budget, (name, count)  # steps of 2 units: coarse
        assert 0.0 <= res["accuracy"][name] <= 1.0
        assert len(res["history"][name]) == 5 and np.all(np.isfinite(res["history"][name]))
    assert "held-out accuracy" in capsys.readouterr().out
    again = demos.main([*args, "--quiet", "--no-plot"])
    assert again["history"] == res["history"]


def test_cells_demo_compares_the_three_cells_and_samples_from_each(tmp_path, capsys):
    """The character model with each cell, one layer, the sLSTM and the mLSTM no larger than
    the LSTM; each run's saved parameters sample text again (the model is rebuilt from
    them); the plot holds the three held-out curves."""
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    res = demos.main(["cells", "--text", str(path), "--hidden", "8", "--steps", "4",
                      "--sample-every", "2", "--seq-len", "8", "--batch", "2", "--no-progress",
                      "--out-dir", str(tmp_path), "--plot", str(tmp_path / "cells.png")])
    assert set(res["runs"]) == {"lstm", "slstm", "mlstm"}
    budget = res["parameters"]["lstm"]
    vocab = sorted(set(TEXT))
    for cell, run in res["runs"].items():
        assert 0.7 * budget <= res["parameters"][cell] <= budget, cell
        assert [s for s, _ in run["evals"]] == [0, 2, 4] and np.isfinite(run["final_loss"])
        params = load_params(tmp_path / f"charlm_{cell}.npz")
        text = demos.sample(params, vocab, 5, prime=vocab[0], rng=np.random.default_rng(0))
        assert len(text) == 5 and set(text) <= set(vocab)
    if res["plot_path"] is not None:
        assert (tmp_path / "cells.png").stat().st_size > 0
    deep = demos.charlm(cell="mlstm", layers=2, hidden=8, text=str(path), steps=2, seq_len=8,
                        batch=2, verbose=False, progress=False, plot=False,
                        out=str(tmp_path / "deep.npz"))
    params = load_params(deep["params_path"])
    assert len(params["rnn"]) == 2 and params["rnn"][1]["Wq"].shape[-1] == 8  # reads layer 0
    text = demos.sample(params, vocab, 5, prime=vocab[0], rng=np.random.default_rng(0))
    assert len(text) == 5 and set(text) <= set(vocab)
    with pytest.raises(ValueError, match="cell must be one of"):
        demos.charlm(cell="gru", text=str(path), steps=1, seq_len=8, batch=2, verbose=False)


#: Tiny settings of every demo, and the files that each writes by default (PNGs only where
#: matplotlib draws them).
DEFAULT_OUTPUTS = {
    "charlm": ([*TINY_CHARLM, "--text", "TEXT"], {"charlm_params.npz", "charlm_params_loss.png"}),
    "adding": (TINY_ADDING, {"adding_params.npz", "adding_params_loss.png"}),
    "bidirectional": (["--T", "4", "--steps", "2", "--test-size", "4", "--no-progress"],
                      {"bidirectional_loss.png"}),
    "recall": (["--pairs", "1", "--queries", "1", "--keys", "2", "--values", "2", "--hidden",
                "4", "--steps", "2", "--test-size", "4", "--no-progress"], {"recall_loss.png"}),
    "cells": (["--text", "TEXT", "--hidden", "4", "--steps", "2", "--sample-every", "1",
               "--seq-len", "8", "--batch", "2", "--no-progress"],
              {"charlm_lstm.npz", "charlm_slstm.npz", "charlm_mlstm.npz", "charlm_cells.png"}),
}
ROOT = Path(__file__).resolve().parents[1]


def _ignored(name, gitignore):
    """Whether ``.gitignore`` ignores the file ``name`` at the top of the checkout."""
    ignored = False
    for line in gitignore.splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").lstrip("/")
        if "/" not in pattern.rstrip("/") and fnmatch.fnmatchcase(name, pattern):
            ignored = not negated
    return ignored


def test_gitignore_matcher():
    rules = "# comment\n/a.npz\n*.png\n!keep.png\nsub/b.npz\n"
    assert _ignored("a.npz", rules) and _ignored("loss.png", rules)
    assert not _ignored("keep.png", rules) and not _ignored("b.npz", rules)
    assert not _ignored("a.npzx", rules)


def test_every_default_output_of_the_demos_is_ignored_by_git(tmp_path, monkeypatch):
    """Each demo run from the top of a checkout with its defaults writes only files that
    ``.gitignore`` names (the tiny settings change no file name)."""
    monkeypatch.chdir(tmp_path)
    text = tmp_path.parent / f"{tmp_path.name}.txt"
    text.write_text(TEXT, encoding="utf-8")
    plots = importlib.util.find_spec("matplotlib") is not None
    written = set()
    for name, (args, outputs) in DEFAULT_OUTPUTS.items():
        before = set(os.listdir(tmp_path))
        args = [str(text) if a == "TEXT" else a for a in args]
        demos.main([name, *args, "--quiet"])
        new = set(os.listdir(tmp_path)) - before
        assert new == {f for f in outputs if plots or not f.endswith(".png")}, name
        written |= new
    gitignore = ROOT / ".gitignore"
    if not gitignore.exists():
        pytest.skip("no .gitignore next to the tests")
    rules = gitignore.read_text(encoding="utf-8")
    assert not [f for f in sorted(written) if not _ignored(f, rules)]


def test_every_demo_says_how_long_its_defaults_take(capsys):
    """``--help`` of each demo ends its description with the measured run time of its
    defaults, and the README says the same."""
    from xlstm.demos._cli import DEFAULT_RUN_TIME

    assert set(DEFAULT_RUN_TIME) == set(demos.DEMOS)
    readme = ROOT / "README.md"
    readme = " ".join(readme.read_text(encoding="utf-8").split()) if readme.exists() else None
    for name, took in DEFAULT_RUN_TIME.items():
        assert re.fullmatch(r"\d+ (seconds|minutes?)", took), took
        with pytest.raises(SystemExit) as info:
            demos.main([name, "--help"])
        assert info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert f"With the defaults it takes about {took} on two CPU cores." in text, name
        if readme is not None:
            said = re.search(rf"python -m xlstm demo {name}\b(?:(?!python -m xlstm demo ).)*?"
                             rf"about {took}", readme)
            assert said is not None, f"the README does not say that demo {name} takes {took}"
