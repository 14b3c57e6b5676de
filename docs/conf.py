"""Sphinx configuration of the xlstm documentation.

Build: ``bash .ci/docs.sh`` (or ``sphinx-build -W --keep-going -b html docs docs/_build/html``).
Nothing is generated into the source tree: the API reference is written out in
``api.rst``, and the build fails when a name of ``xlstm.__all__`` is not documented there.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import types
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
    "sphinx.ext.viewcode",  # a [source] link beside every documented object
    "sphinx-mathjax-offline",  # MathJax served from _static/, never from the network
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

# viewcode: follow the public names to the modules that define them (xlstm.LSTM lives in
# xlstm.models.recurrent), so that their [source] links lead there.
viewcode_follow_imported_members = True

# The theme. Nothing is fetched from the network when a page is read: the theme's fonts and
# icons ship with it, and sphinx-mathjax-offline copies MathJax into _static/mathjax.
html_theme = "pydata_sphinx_theme"
html_title = f"xlstm {release}"
html_short_title = "xlstm"
html_last_updated_fmt = None
html_show_sourcelink = False  # the [source] links of viewcode show the code; no .rst links
html_theme_options = {
    "logo": {"text": f"xlstm {release}"},
    "navbar_align": "left",
    "header_links_before_dropdown": 5,
    "navbar_persistent": [],
    "navbar_end": ["search-button", "theme-switcher"],
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version", "theme-version"],
}
html_sidebars = {"**": []}  # a flat site: the navigation bar lists every page
html_context = {"default_mode": "auto"}  # light or dark, as the reader's system is


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

    Docstrings may name a public object by its defining module (``xlstm.lstm.lstm_forward``),
    or by its bare name in that module's own docstrings (``fit`` in ``xlstm.training.fit``);
    the reference documents it once, under the package.
    """
    if node.get("refdomain") != "py":
        return None
    module, _, name = node.get("reftarget", "").rpartition(".")
    bare = not module
    if bare:  # look in the module whose docstring holds it
        module = node.get("py:module") or ""
    if not module.startswith("xlstm.") or name not in xlstm.__all__:
        return None
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    # A bare name that is a submodule there (``xlstm.training.fit``) cannot be what a
    # :func: or :class: role names: it means the public object.
    same = found is getattr(xlstm, name) or (bare and isinstance(found, types.ModuleType))
    if not same:
        return None
    return env.get_domain("py").resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], f"xlstm.{name}", node, contnode
    )


def _class_signature(app, what, name, obj, options, signature, return_annotation):
    """A class whose metaclass defines ``__call__`` (the model classes' type translates
    torch's argument names) is shown by autodoc with that call's ``(*args, **kwargs)``:
    show its ``__init__``'s parameters instead, without annotations (as every signature
    here: the numpydoc sections carry the types)."""
    if what != "class" or signature != "(*args, **kwargs)":
        return None
    try:
        sig = inspect.signature(obj.__init__)
    except (TypeError, ValueError):
        return None
    params = [q.replace(annotation=inspect.Parameter.empty)
              for q in list(sig.parameters.values())[1:]]  # without self
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty)), None


def setup(app):
    app.connect("autodoc-process-signature", _class_signature)
    app.connect("env-check-consistency", _check_api_complete)
    app.connect("missing-reference", _public_alias)
    return {"parallel_read_safe": True}
