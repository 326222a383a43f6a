"""The code blocks of the README and of every docs page, found the same way by every test.

A block may carry one marker, an HTML comment on the line right before its fence (invisible on
GitHub and in the site):

- ``<!-- docs-test: slow -->``: run only by ``make test-slow``;
- ``<!-- docs-test: needs MODULE -->``: skipped when ``MODULE`` is not installed;
- ``<!-- docs-test: run by tests/FILE.py -->``: that file runs it (in a process of its own);
- ``<!-- docs-test: not run: REASON -->``: shell lines that install or run the suite itself.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: the pages whose code blocks must run (the study reports under docs/results are generated)
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if "results" not in p.parts)]
#: the block languages the tests run
CODE = ("python", "bash")


@dataclasses.dataclass(frozen=True)
class Block:
    page: pathlib.Path
    line: int
    lang: str
    code: str
    heading: str
    marker: str  # "" or the marker's text after "docs-test:"

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: pathlib.Path) -> list[Block]:
    """Every fenced block of ``page`` with its language, nearest heading and marker."""
    out, heading, lines = [], "", page.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            lang = line[3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            prev = lines[i - 1].strip() if i else ""
            marker = re.fullmatch(r"<!-- docs-test: (.*) -->", prev)
            out.append(Block(page, i + 1, lang, "\n".join(lines[i + 1:end]) + "\n", heading,
                             marker.group(1).strip() if marker else ""))
            i = end + 1
            continue
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        i += 1
    return out


def section_block(title: str, lang: str = "python") -> str:
    """The first ``lang`` block under the heading ``title`` on any page (titles are unique)."""
    found = [b for page in PAGES for b in blocks(page) if b.heading == title and b.lang == lang]
    assert found, f"no page has a {lang} block under '{title}'"
    return found[0].code


def shell_commands(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blanks dropped."""
    joined = code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip() if not line.lstrip().startswith("python -c") else line.strip()
        if line:
            out.append(line)
    return out
