"""Copies each committed report's README summary block into README.md (between its markers).

    python experiments/readme_blocks.py

The blocks are the reports' own text (tests/test_docs.py checks they match), so the README
never states a result the report does not.
"""
from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: marker name -> the report that holds the block
BLOCKS = {"transformer-v2-scratch-summary": "docs/results/transformer_v2_scratch_cpu/report.md",
          "transformer-v2-finetune-summary": "docs/results/transformer_v2_finetune_cpu/report.md"}


def block(text: str, name: str) -> str:
    """The text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` (stripped)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"no {begin} ... {end} block")
    return text[text.index(begin) + len(begin):text.index(end)].strip()


def main():
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, report in BLOCKS.items():
        body = block((ROOT / report).read_text(), name)
        pattern = re.compile(re.escape(f"<!-- {name}:begin -->") + ".*?" + re.escape(f"<!-- {name}:end -->"), re.S)
        text = pattern.sub(lambda _: f"<!-- {name}:begin -->\n\n{body}\n\n<!-- {name}:end -->", text)
    readme.write_text(text)
    print(f"copied {len(BLOCKS)} block(s) into {readme}")


if __name__ == "__main__":
    main()
