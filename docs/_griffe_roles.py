"""Griffe extension for the API pages: the docstrings' Sphinx roles (``:func:`tune```,
``:class:`TuneResult```, ...) are shown as code, which is how Markdown reads them."""
from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:func|class|attr|data|meth|mod|obj|exc|math):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
