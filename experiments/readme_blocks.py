"""Copies each committed report's summary blocks into README.md and the docs pages (between
their markers).

    python experiments/readme_blocks.py

The blocks are the reports' own text (tests/test_docs.py checks they match), so neither the
README nor a docs page states a result the report does not.
"""
from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: (marker name, the report that holds the block, the pages that show it); one marker may come
#: from two reports (each study page shows its own study's box; the README the current one's)
BLOCKS = (
    ("should-i-use-dreg", "docs/results/dreg_study_v4_full/report.md", ("README.md", "docs/studies/dreg_v4.md")),
    ("dreg-study-v4-summary", "docs/results/dreg_study_v4_full/report.md", ("docs/studies/dreg_v4.md",)),
    ("should-i-use-dreg", "docs/results/dreg_study_v3_full/report.md", ("docs/studies/dreg_v3.md",)),
    ("dreg-study-v3-summary", "docs/results/dreg_study_v3_full/report.md", ("docs/studies/dreg_v3.md",)),
    ("dreg-study-summary", "docs/results/dreg_study_full/report.md", ("docs/history/dreg_v2.md",)),
    ("transformer-v2-scratch-summary", "docs/results/transformer_v2_scratch_cpu/report.md", ("docs/studies/transformer_v2.md",)),
    ("transformer-v2-finetune-summary", "docs/results/transformer_v2_finetune_cpu/report.md", ("docs/studies/transformer_v2.md",)),
)


def block(text: str, name: str) -> str:
    """The text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` (stripped)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"no {begin} ... {end} block")
    return text[text.index(begin) + len(begin):text.index(end)].strip()


def main():
    from dreg_jax._files import atomic_write

    for name, report, pages in BLOCKS:
        body = block((ROOT / report).read_text(), name)
        pattern = re.compile(re.escape(f"<!-- {name}:begin -->") + ".*?" + re.escape(f"<!-- {name}:end -->"), re.S)
        for page in pages:
            path = ROOT / page
            text = pattern.sub(lambda _: f"<!-- {name}:begin -->\n\n{body}\n\n<!-- {name}:end -->", path.read_text())
            atomic_write(path, text, what=page)  # the README whole, never half of it
            print(f"copied {name} into {page}")


if __name__ == "__main__":
    main()
