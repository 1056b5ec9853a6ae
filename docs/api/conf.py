"""Sphinx configuration of the API reference: `make docs` builds it offline into docs/_build."""

project = "metattt"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
autodoc_typehints = "none"  # the signatures carry them; the docstrings say what they mean
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # NamedTuple "Attributes:" sections as fields, not duplicate entries
exclude_patterns = ["_build"]
html_theme = "alabaster"
