"""Sphinx configuration of the xlstm documentation.

Build: ``bash .ci/docs.sh`` (or ``sphinx-build -W --keep-going -b html docs docs/_build/html``).
Nothing is generated into the source tree: the API reference is written out in
``api.rst``, and the build fails when a name of ``xlstm.__all__`` is not documented there.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

# Document the checkout next to this folder, even when another copy is installed.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import xlstm  # noqa: E402

project = "xlstm"
author = "the xlstm authors"
copyright = "the xlstm authors, MIT License"
version = release = xlstm.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
]

root_doc = "index"
nitpicky = True  # every cross-reference must resolve
exclude_patterns = ["_build"]
templates_path: list[str] = []
html_static_path: list[str] = []

# autodoc: members are listed explicitly in api.rst, in source order.
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpydoc sections carry the types
autosummary_generate = False  # summary tables only; no stub files

# numpydoc
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

html_theme = "alabaster"
html_title = f"xlstm {release}"
html_theme_options = {
    "description": "The LSTM of the step-by-step notebook, written once for the Python array API",
    "fixed_sidebar": True,
}


def _warning_to_sphinx(message, category, filename, lineno, file=None, line=None):
    """Report a Python warning raised during the build (numpydoc's docstring warnings are
    Python ``UserWarning``\ s) as a Sphinx warning, so that ``-W`` fails on it too."""
    from sphinx.util import logging

    logging.getLogger("xlstm.docs").warning(
        "%s (raised at %s:%s): %s", category.__name__, filename, lineno, message
    )


warnings.showwarning = _warning_to_sphinx


def _check_api_complete(app, env):
    """Warn (an error under ``-W``) for every public name missing from the API reference."""
    from sphinx.util import logging

    logger = logging.getLogger("xlstm.docs")
    documented = set(env.domaindata["py"]["objects"]) | set(env.domaindata["py"]["modules"])
    for name in xlstm.__all__:
        if f"xlstm.{name}" not in documented:
            logger.warning("xlstm.%s is in xlstm.__all__ but not in the API reference", name)


def _public_alias(app, env, node, contnode):
    """Resolve ``xlstm.<module>.<name>`` to the documented ``xlstm.<name>``.

    Docstrings may name a public object by its defining module (``xlstm.lstm.lstm_forward``);
    the reference documents it once, under the package.
    """
    if node.get("refdomain") != "py":
        return None
    module, _, name = node.get("reftarget", "").rpartition(".")
    if not module.startswith("xlstm.") or name not in xlstm.__all__:
        return None
    try:
        same = getattr(importlib.import_module(module), name) is getattr(xlstm, name)
    except (ImportError, AttributeError):
        return None
    if not same:
        return None
    return env.get_domain("py").resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], f"xlstm.{name}", node, contnode
    )


def setup(app):
    app.connect("env-check-consistency", _check_api_complete)
    app.connect("missing-reference", _public_alias)
    return {"parallel_read_safe": True}
