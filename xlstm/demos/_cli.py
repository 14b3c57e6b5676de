"""The demos' command-line options: argparse types that check single values, and the parsers.

Every bad value is an argparse error (usage, one error line, exit status 2) found before any
training: the type= functions here check single values, ``xlstm.demos`` what needs several
or the environment.
"""

from __future__ import annotations

import argparse
import math

from .._lib.compat import BACKENDS
from ._run import folder_problem, input_problem, output_problem


def int_at_least(low):
    """An argparse type: an integer >= ``low``."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def positive_float(text):
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def path_type(problem, name, doc):
    """An argparse type named ``name``: the path itself, or the error that ``problem(path)``
    says (None: no problem)."""

    def parse(text):
        why = problem(text)
        if why:
            raise argparse.ArgumentTypeError(why)
        return text

    parse.__name__, parse.__qualname__, parse.__doc__ = name, name, doc
    return parse


output_file = path_type(output_problem, "output_file", "A file path that can be written: its "
                        "folder exists and is writable, it is no folder.")
output_folder = path_type(folder_problem, "output_folder",
                          "A folder that exists and can be written in.")
input_file = path_type(input_problem, "input_file", "A regular file that exists and can be "
                       "read (not a folder, a device or a pipe).")


def common_options(parser, *, out=None, plot=None):
    """The options that every demo takes: ``out`` is the default parameter file (None: the
    demo writes none), ``plot`` the default loss-curve file of a demo without one."""
    parser.add_argument("--backend", default="numpy", choices=BACKENDS,
                        help="array backend (default numpy)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                        help="default float32")
    parser.add_argument("--seed", type=int_at_least(0), default=0,
                        help="random seed, an integer >= 0 (default 0)")
    if out is not None:
        parser.add_argument("--out", type=output_file, default=out,
                            help=f"parameter file to write (default {out})")
    where = "next to --out, as <out>_loss.png" if out is not None else plot
    parser.add_argument("--plot", type=output_file, default=plot,
                        help=f"loss-curve PNG (default: {where})")
    parser.add_argument("--no-plot", dest="plot", action="store_false",
                        help="write no loss curve")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no progress bar (default: one when on a terminal)")
    parser.add_argument("--quiet", dest="verbose", action="store_false",
                        help="print nothing")


def training_options(parser, *, steps, hidden, batch, lr, clip, steps_what="optimizer steps",
                     hidden_what="hidden size", batch_of="sequences"):
    """``--steps``, ``--hidden``, ``--batch``, ``--lr`` and ``--clip``, with a demo's defaults."""
    parser.add_argument("--steps", type=int_at_least(1), default=steps,
                        help=f"{steps_what} (default {steps})")
    parser.add_argument("--hidden", type=int_at_least(1), default=hidden,
                        help=f"{hidden_what} (default {hidden})")
    parser.add_argument("--batch", type=int_at_least(1), default=batch,
                        help=f"{batch_of} per minibatch (default {batch})")
    parser.add_argument("--lr", type=positive_float, default=lr,
                        help=f"Adam learning rate (default {lr:g})")
    parser.add_argument("--clip", type=positive_float, default=clip,
                        help=f"global-norm clip (default {clip:g})")


def text_options(parser, *, steps, hidden, **what):
    """The options of a demo that learns a text: ``--text`` and :func:`training_options`
    (``steps`` and ``hidden``: their defaults; ``what``: their ``steps_what`` and
    ``hidden_what``)."""
    parser.add_argument("--text", type=input_file, default=None,
                        help="UTF-8 text file to learn (default: Python's pydoc_data.topics)")
    training_options(parser, steps=steps, hidden=hidden, batch=32, lr=5e-3, clip=5.0,
                     batch_of="contiguous streams of the text", **what)


def comparison_options(parser, *, steps, hidden, lr, hidden_what, plot):
    """The options of a demo that trains several models on sequences and compares their
    held-out accuracy: :func:`training_options`, ``--test-size`` and :func:`common_options`."""
    training_options(parser, steps=steps, hidden=hidden, batch=32, lr=lr, clip=5.0,
                     steps_what="optimizer steps per model", hidden_what=hidden_what)
    parser.add_argument("--test-size", type=int_at_least(1), default=512,
                        help="held-out sequences (default 512)")
    common_options(parser, plot=plot)


#: How long each demo takes with its defaults on numpy float32 with the compiled loops, two
#: CPU cores and numpy's default BLAS threads (measured; ``--help`` and the README say it).
DEFAULT_RUN_TIME = {
    "charlm": "90 seconds",
    "adding": "15 seconds",
    "bidirectional": "10 seconds",
    "recall": "40 seconds",
    "cells": "90 seconds",
}


def demo_parser(parser, command, description):
    """``parser``, or a new parser of ``python -m xlstm demo <command>``, with the usage line
    and the ``description`` of a demo, which ends with how long its defaults take."""
    p = parser or argparse.ArgumentParser(prog=f"python -m xlstm demo {command}")
    p.usage = "%(prog)s [options]"  # the options are listed by --help
    p.description = (f"{description} With the defaults it takes about "
                     f"{DEFAULT_RUN_TIME[command]} on two CPU cores.")
    return p


def charlm_parser(parser=None):
    """The options of :func:`xlstm.demos.charlm`, added to ``parser`` or a new parser."""
    p = demo_parser(parser, "charlm",
                    "Character-level language model, a stacked LSTM trained by truncated "
                    "backpropagation through time: train on a text, print samples as it "
                    "learns, save the parameters and a loss curve.")
    text_options(p, steps=2000, hidden=128, hidden_what="hidden size of every layer")
    p.add_argument("--layers", type=int_at_least(1), default=2,
                   help="stacked layers (default 2; the mLSTM runs one)")
    p.add_argument("--cell", default="lstm", choices=("lstm", "slstm", "mlstm"),
                   help="the model: LSTM (default), sLSTM or mLSTM")
    p.add_argument("--seq-len", type=int_at_least(1), default=50,
                   help="characters per step, the span of backpropagation (default 50)")
    p.add_argument("--sample-every", type=int_at_least(0), default=500,
                   help="evaluate and print a sample every N steps (default 500, 0: never)")
    p.add_argument("--sample-len", type=int_at_least(0), default=200,
                   help="characters per sample (default 200)")
    p.add_argument("--temperature", type=positive_float, default=0.7,
                   help="sampling temperature (default 0.7)")
    p.add_argument("--prime", default="The ", help="text that starts each sample")
    common_options(p, out="charlm_params.npz")
    return p


def adding_parser(parser=None):
    """The options of :func:`xlstm.demos.adding`, added to ``parser`` or a new parser."""
    p = demo_parser(parser, "adding",
                    "The adding problem (Hochreiter and Schmidhuber 1997, experiment 4): "
                    "train until the test error is below --target, save the parameters.")
    p.add_argument("--T", type=int_at_least(2), default=50,
                   help="sequence length, at least 2 (default 50)")
    training_options(p, steps=5000, hidden=32, batch=64, lr=1e-2, clip=1.0,
                     steps_what="most optimizer steps")
    p.add_argument("--eval-every", type=int_at_least(1), default=100,
                   help="score the test set every N steps (default 100)")
    p.add_argument("--test-size", type=int_at_least(1), default=1000,
                   help="test sequences (default 1000)")
    p.add_argument("--target", type=positive_float, default=0.01,
                   help="stop once the test MSE is below this (default 0.01)")
    common_options(p, out="adding_params.npz")
    return p


def bidirectional_parser(parser=None):
    """The options of :func:`xlstm.demos.bidirectional`, added to ``parser`` or a new one."""
    p = demo_parser(parser, "bidirectional",
                    "Bidirectional against one-direction LSTM on variable-length "
                    "sequences: label every step with the next symbol; compare held-out "
                    "accuracy, write both loss curves.")
    p.add_argument("--T", type=int_at_least(2), default=16,
                   help="padded length; lengths are uniform in [T/2, T] (default 16)")
    p.add_argument("--vocab", type=int_at_least(2), default=4, help="symbols (default 4)")
    comparison_options(p, steps=300, hidden=16, lr=2e-2, hidden_what="hidden size per direction",
                       plot="bidirectional_loss.png")
    return p


def recall_parser(parser=None):
    """The options of :func:`xlstm.demos.recall`, added to ``parser`` or a new one."""
    p = demo_parser(parser, "recall",
                    "Multi-query associative recall: LSTM, sLSTM and mLSTM of about equal "
                    "size read key-value pairs and answer queries; compare held-out "
                    "accuracy, write the loss curves.")
    p.add_argument("--pairs", type=int_at_least(1), default=4,
                   help="key-value pairs per sequence (default 4)")
    p.add_argument("--queries", type=int_at_least(1), default=4,
                   help="queries after the pairs (default 4)")
    p.add_argument("--keys", type=int_at_least(1), default=8, help="key symbols (default 8)")
    p.add_argument("--values", type=int_at_least(2), default=8,
                   help="value symbols (default 8)")
    comparison_options(p, steps=1000, hidden=32, lr=5e-3,
                       hidden_what="the LSTM's hidden size; the others match its parameters",
                       plot="recall_loss.png")
    return p


def cells_parser(parser=None):
    """The options of :func:`xlstm.demos.charlm_cells`, added to ``parser`` or a new one."""
    p = demo_parser(parser, "cells",
                    "The character-level language model with an LSTM, an sLSTM and an "
                    "mLSTM of one layer and about equal size: the held-out losses of the "
                    "three in one plot.")
    text_options(p, steps=500, hidden=64, steps_what="optimizer steps per model",
                 hidden_what="the LSTM's hidden size; the others match its parameters")
    p.add_argument("--seq-len", type=int_at_least(1), default=50,
                   help="characters per step, the span of backpropagation (default 50)")
    p.add_argument("--sample-every", type=int_at_least(1), default=100,
                   help="measure the held-out loss every N steps (default 100)")
    p.add_argument("--out-dir", type=output_folder, default=".",
                   help="folder of the parameter files (default .)")
    common_options(p, plot="charlm_cells.png")
    return p

