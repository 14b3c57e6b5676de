"""Four training demos: a character-level language model, the adding problem, a
bidirectional model on variable-length sequences, and associative recall with the xLSTM
cells.

Run them from the command line::

    python -m xlstm demo charlm [--text FILE] [--steps N] [--backend torch] ...
    python -m xlstm demo adding [--T 50] [--hidden 32] ...
    python -m xlstm demo bidirectional [--T 16] [--vocab 4] ...
    python -m xlstm demo recall [--pairs 4] [--steps 1000] ...
    python -m xlstm demo cells [--hidden 64] [--steps 500] ...

or from Python with :func:`charlm` and :func:`adding`, which take the same options as
keyword arguments and return a dict of results (losses, wall time, paths written).

* ``charlm`` learns to predict the next character of a text (by default the English
  documentation strings of ``pydoc_data.topics``, which ship with CPython) with a 2-layer
  :class:`xlstm.LSTM` and a linear head, trained by truncated backpropagation through time
  (the text read as contiguous streams, each chunk starting from the state in which the
  previous one ended) with :func:`xlstm.softmax_cross_entropy`, Adam and gradient clipping,
  and prints text it samples one character at a time as it learns. It saves the tree
  ``{"rnn": <the LSTM's params>, "head": {"Wy", "by"}}`` with :func:`xlstm.save_params`; the
  vocabulary is ``sorted(set(text))``, so it can be rebuilt from the same text to sample
  from the saved parameters later (:func:`sample`).
* ``adding`` is experiment 4 of Hochreiter and Schmidhuber (1997): read a sequence of
  (value, marker) pairs and output the sum of the two marked values, with
  :func:`xlstm.last_step_mse`. Always answering 1.0 scores a mean squared error of 1/6;
  the problem counts as solved below 0.01.
* ``bidirectional`` trains a bidirectional :class:`xlstm.LSTM` and a one-direction one on
  padded variable-length sequences (``lengths``) to label every step with the next
  symbol, which only the reverse direction can see, and compares their held-out accuracy.
* ``recall`` is multi-query associative recall (the xLSTM paper's memory task): an
  :class:`xlstm.LSTM`, an :class:`xlstm.SLSTM` and an :class:`xlstm.MLSTM` of about equal
  size read key-value pairs, then answer queries; it compares their held-out accuracy.
* ``cells`` (:func:`charlm_cells`) runs ``charlm`` with each of the three cells, one
  layer, about equal parameter counts, and draws their held-out losses in one plot.

Everything random is drawn on the host from ``numpy.random.default_rng`` streams derived
from ``seed`` and then moved to the chosen backend, so a run on the CPU is reproducible.

One module per demo (``char_lm``, ``adding_problem``, ``bidirectional`` and ``recall``), their
command-line options (``_cli``), the loss curve (``_plot``) and what the demos do alike
(``_run``: the backend, the checks, the linear head on a model's outputs); this module is
the command line: it checks the arguments and runs the demo by name.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from .._lib.compat import BackendUnavailable, load_backend
from ._cli import (
    adding_parser,
    bidirectional_parser,
    cells_parser,
    charlm_parser,
    recall_parser,
)
from ._run import ArgumentError
from .adding_problem import adding, adding_data
from .bidirectional import bidirectional, next_symbol_data
from .char_lm import charlm, charlm_cells, held_out_size, load_corpus, sample
from .recall import recall, recall_data

__all__ = [
    "charlm", "adding", "bidirectional", "charlm_main", "adding_main", "main", "load_corpus",
    "sample", "adding_data", "next_symbol_data", "recall", "recall_data",
    "charlm_cells", "ArgumentError", "add_parsers", "run_parsed",
]

#: The demos by command-line name.
DEMOS = {"charlm": charlm, "adding": adding, "bidirectional": bidirectional, "recall": recall,
         "cells": charlm_cells}


def _check_args(parser, args):
    """The checks that need the environment or several arguments; parser.error on failure."""
    try:
        load_backend(args.backend)
    except BackendUnavailable as exc:
        parser.error(f"argument --backend: {exc}")
    if getattr(args, "text", None) is not None:
        try:
            raw = load_corpus(args.text)
            held_out_size(len(raw), len(set(raw)), args.seq_len, args.batch)
        except ArgumentError as exc:
            parser.error(f"argument {exc.option}: {exc.reason}")
        except UnicodeDecodeError as exc:
            parser.error(f"argument --text: {args.text!r} is not UTF-8 text ({exc.reason})")
        except OSError as exc:
            parser.error(f"argument --text: cannot read {args.text!r}: {exc.strerror}")
    return args


def _run_demo(parser, demo, args):
    """``demo(**args)``, with an :class:`ArgumentError` (a value that the demo refuses
    before it trains: a count below what another needs, a model too large for the
    machine) reported as the argparse error of its option."""
    try:
        return demo(**args)
    except ArgumentError as exc:
        parser.error(f"argument {exc.option}: {exc.reason}")


#: One line per demo, for the list of ``python -m xlstm demo --help``.
HELP = {
    "charlm": "character-level language model (a stacked LSTM, or an sLSTM or mLSTM)",
    "adding": "the adding problem of Hochreiter and Schmidhuber (1997)",
    "bidirectional": "bidirectional against one-direction LSTM on variable lengths",
    "recall": "associative recall with an LSTM, an sLSTM and an mLSTM",
    "cells": "the character model with an LSTM, an sLSTM and an mLSTM",
}

#: The function that adds each demo's options to a parser, by command-line name.
PARSERS = {"charlm": charlm_parser, "adding": adding_parser,
           "bidirectional": bidirectional_parser, "recall": recall_parser,
           "cells": cells_parser}


def add_parsers(sub: Any) -> dict[str, argparse.ArgumentParser]:
    """Add one subcommand per demo to ``sub``, the result of ``add_subparsers``.

    Parameters
    ----------
    sub : argparse subparsers action
        Where the demos go: each becomes ``sub.add_parser(name)``, with its options, its
        usage line and its description.

    Returns
    -------
    dict
        The demos' parsers by name. Each one's namespace carries ``demo_parser`` (the
        parser itself), which :func:`run_parsed` uses.

    Examples
    --------
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="xlstm demo")
    >>> parsers = add_parsers(parser.add_subparsers(dest="demo", metavar="NAME"))
    >>> sorted(parsers)
    ['adding', 'bidirectional', 'cells', 'charlm', 'recall']
    >>> parsers["adding"].format_usage()
    'usage: xlstm demo adding [options]\\n'
    """
    parsers = {}
    for name, add_options in PARSERS.items():
        p = add_options(sub.add_parser(name, help=HELP[name]))
        p.set_defaults(demo_parser=p)
        parsers[name] = p
    return parsers


def run_parsed(args: argparse.Namespace, *, ignore: Sequence[str] = ()) -> dict[str, Any]:
    """Run the demo that ``args`` names, parsed by a parser of :func:`add_parsers`.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed command line: ``demo`` (the name), ``demo_parser`` and the demo's options.
    ignore : sequence of str, optional
        Other names in ``args`` that are not options of the demo (those of an enclosing
        command line).

    Returns
    -------
    dict
        The demo's result dict. A value that the demo refuses ends in the argparse error of
        its option (``SystemExit(2)``), before any training.
    """
    opts = {k: v for k, v in vars(args).items()
            if k not in ("demo", "demo_parser", *ignore)}
    parser = args.demo_parser
    opts = vars(_check_args(parser, argparse.Namespace(**opts)))
    return _run_demo(parser, DEMOS[args.demo], opts)


def charlm_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line of :func:`charlm`; returns its result dict."""
    parser = charlm_parser()
    return _run_demo(parser, charlm, vars(_check_args(parser, parser.parse_args(argv))))


def adding_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line of :func:`adding`; returns its result dict."""
    parser = adding_parser()
    return _run_demo(parser, adding, vars(_check_args(parser, parser.parse_args(argv))))


def main(argv: Sequence[str] | None = None, *,
         prog: str = "python -m xlstm demo") -> dict[str, Any]:
    """Run a demo by name: ``main(["charlm", "--steps", "500"])``.

    Parameters
    ----------
    argv : sequence of str, optional
        The demo's name and its options (default ``sys.argv[1:]``).
    prog : str, optional
        The command's name in usage lines and errors.

    Returns
    -------
    dict
        The demo's result dict. Bad arguments raise ``SystemExit(2)`` after argparse prints
        the usage and the error, before any training.
    """
    parser = argparse.ArgumentParser(prog=prog, description="Training demos of xlstm.")
    parsers = add_parsers(parser.add_subparsers(dest="demo", required=True, metavar="NAME"))
    args, extra = parser.parse_known_args(argv)
    if extra:  # the error and usage of the demo's own parser, not the enclosing one's
        parsers[args.demo].error(f"unrecognized arguments: {' '.join(extra)}")
    return run_parsed(args)
