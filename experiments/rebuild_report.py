"""Rebuilds a study's report from the raw results kept beside it.

    python experiments/rebuild_report.py docs/results/dreg_study_full

reads ``DIR/meta.json`` (which study and profile wrote the results) and ``DIR/results.jsonl``
or ``DIR/results.jsonl.gz``, and rewrites ``DIR/report.md`` and its figures with the study's
own report writer: ``write_report(records, profile, DIR, None)``, or the study's
``rebuild_report(DIR, meta)`` where its report needs more than the records. Nothing is trained.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys

#: Studies whose report is a function of the raw results (and meta.json) alone.
REBUILDABLE = ("dreg_study", "dreg_study_v3", "dreg_study_v4", "chainzrule_robustness", "chainzrule_tau", "chainzrule_schedules", "chainzrule_fractions",
               "chainzrule_text",
               "chainzrule_volatility", "coherent_strong", "transformer_study", "transformer_study_v2")


def rebuild(out: pathlib.Path) -> str:
    out = pathlib.Path(out)
    meta_path = out / "meta.json"
    if not meta_path.exists():
        raise SystemExit(f"{out} has no meta.json: it was not written by a study script of this version")
    meta = json.loads(meta_path.read_text())
    study = meta.get("study")
    if study not in REBUILDABLE:
        raise SystemExit(f"{out}: study {study!r} cannot be rebuilt from raw results; rebuildable: "
                         f"{', '.join(REBUILDABLE)}")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    module = importlib.import_module(study)
    if hasattr(module, "rebuild_report"):  # a report built from more than the engine's records
        return module.rebuild_report(out, meta)
    from _common import load_raw_results

    return module.write_report(load_raw_results(out), module.PROFILES[meta["profile"]], out, None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=pathlib.Path, help="report folders (with meta.json and results)")
    args = parser.parse_args(argv)
    for folder in args.folders:
        print(rebuild(folder))
        print(f"rebuilt {folder / 'report.md'}")


if __name__ == "__main__":
    main()
