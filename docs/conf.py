"""Sphinx configuration: Markdown pages (MyST) and API pages from the docstrings (autodoc with
napoleon for the Google-style ``Args:`` sections). Builds offline (no intersphinx):

  sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # the repository root: autodoc imports aol_jax

project = "aol_jax"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
napoleon_google_docstring, napoleon_numpy_docstring = True, False
# "Attributes:" as fields of the class: a NamedTuple's fields are documented by autodoc too.
napoleon_use_ivar = True
autodoc_member_order = "bysource"
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "aol_jax"
