"""MkDocs hook: links from a page to repository files outside ``docs/`` (a script, a test, a
module) become the file's repository path in code font, since the site carries only ``docs/``.
A link to a repository file that does not exist stops the build (the link test checks the same
for the Markdown as it reads on GitHub)."""
from __future__ import annotations

import os
import pathlib
import re

from mkdocs.exceptions import PluginError

_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")


def on_page_markdown(markdown, page, config, files):
    docs = pathlib.Path(config["docs_dir"]).resolve()
    root = docs.parent
    here = (docs / page.file.src_path).parent

    def outside(match):
        text, target = match.group(1), match.group(2)
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            return match.group(0)
        path = (here / target.split("#")[0]).resolve()
        if path.is_relative_to(docs):
            return match.group(0)
        if not path.is_relative_to(root) or not path.exists():
            raise PluginError(f"{page.file.src_path}: the link {target!r} leaves the repository or names a missing file")
        shown = os.path.relpath(path, root) + ("/" if path.is_dir() else "")
        plain = text.strip("`")
        return f"`{shown}`" if plain == shown else f"{text} (`{shown}`)"

    return _LINK.sub(outside, markdown)
