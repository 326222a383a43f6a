"""Your data as you meant it: a table of CSV files (each written here), every one read as intended
(classes, columns, values checked) or refused by the CLI in one line naming the file, the column
and the CSV line; never a traceback, never a silent guess."""
import csv
import io

import numpy as np
import pytest

from dreg_jax.cli import main as cli_main
from dreg_jax.data import from_csv

ROWS = 30


def table(labels=None, header=("a", "b", "c", "label"), cells=None, extra=None, rows=ROWS):
    """CSV text: numeric a, b, categorical c, target label (alternating classes by default)."""
    labels = labels or [str(i % 2) for i in range(rows)]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    for i in range(rows):
        row = [f"{0.5 * i:.2f}", f"{(7 * i) % 11}", "xy"[i % 3 == 0], labels[i]]
        if extra:
            row = [*row, *extra(i)]
        w.writerow(row[: len(header)] if len(header) <= len(row) else row + [""] * (len(header) - len(row)))
    text = out.getvalue()
    if cells:  # {(row index, column index): new text}, applied to the data rows
        lines = text.splitlines()
        for (r, c), value in cells.items():
            parts = next(csv.reader([lines[r + 1]]))
            parts[c] = value
            buf = io.StringIO()
            csv.writer(buf, lineterminator="").writerow(parts)
            lines[r + 1] = buf.getvalue()
        text = "\n".join(lines) + "\n"
    return text


def with_label(i, value, base=None):
    labels = base or [str(k % 2) for k in range(ROWS)]
    labels = list(labels)
    labels[i] = value
    return labels


# name: (csv text, target, from_csv options, expected)
# expected: dict(classes=..., features=...) for a dataset, or ("refused", column or None, line or None, words)
NAMES = [f"person {i}" for i in range(ROWS)]
CASES = {
    "clean 0/1 labels": (table(), "label", {}, dict(classes=("0", "1"), features=("a", "b", "c=x", "c=y"))),
    "labels 200/404 are two classes": (table([("200", "404")[i % 2] for i in range(ROWS)]), "label", {},
                                       dict(classes=("200", "404"))),
    "labels 1/2 have no phantom 0": (table([str(1 + i % 2) for i in range(ROWS)]), "label", {}, dict(classes=("1", "2"))),
    "integral float labels": (table([f"{1 + i % 2}.0" for i in range(ROWS)]), "label", {}, dict(classes=("1", "2"))),
    "string labels": (table([("cat", "dog")[i % 2] for i in range(ROWS)]), "label", {}, dict(classes=("cat", "dog"))),
    "labels with spaces": (table([(" cat", "dog ")[i % 2] for i in range(ROWS)]), "label", {}, dict(classes=("cat", "dog"))),
    "negative labels": (table([("-1", "1")[i % 2] for i in range(ROWS)]), "label", {}, dict(classes=("-1", "1"))),
    "three classes": (table([str(i % 3) for i in range(ROWS)]), "label", {}, dict(classes=("0", "1", "2"))),
    "mixed number and name labels": (table([("1", "dog")[i % 2] for i in range(ROWS)]), "label", {}, dict(classes=("1", "dog"))),
    "numeric label order": (table([("9", "10")[i % 2] for i in range(ROWS)]), "label", {}, dict(classes=("9", "10"))),
    "label NA": (table(with_label(4, "NA")), "label", {}, ("refused", "label", 6, "missing")),
    "label empty": (table(with_label(4, "")), "label", {}, ("refused", "label", 6, "missing")),
    "label nan": (table(with_label(5, "nan")), "label", {}, ("refused", "label", 7, "missing")),
    "label null": (table(with_label(0, "null")), "label", {}, ("refused", "label", 2, "missing")),
    "label N/A": (table(with_label(9, "N/A")), "label", {}, ("refused", "label", 11, "missing")),
    "label 1.5": (table(with_label(3, "1.5")), "label", {}, ("refused", "label", 5, "not a class label")),
    "label inf": (table(with_label(3, "inf")), "label", {}, ("refused", "label", 5, "not a class label")),
    "label -inf": (table(with_label(8, "-inf")), "label", {}, ("refused", "label", 10, "not a class label")),
    "label 1e400": (table(with_label(8, "1e400")), "label", {}, ("refused", "label", 10, "not a class label")),
    "duplicate feature name": (table(header=("a", "a", "c", "label")), "label", {}, ("refused", "a", None, "more than once")),
    "duplicate target column": (table(header=("a", "label", "c", "label")), "label", {}, ("refused", "label", None, "more than once")),
    "unnamed column": (table(header=("a", "", "c", "label")), "label", {}, ("refused", None, None, "no name")),
    "numeric column with n/a": (table(cells={(5, 0): "n/a"}), "label", {}, ("refused", "a", 7, "missing")),
    "numeric column with a dash": (table(cells={(2, 1): "-"}), "label", {}, ("refused", "b", 4, "missing")),
    "numeric column with NaN": (table(cells={(2, 1): "NaN"}), "label", {}, ("refused", "b", 4, "missing")),
    "numeric column with ?": (table(cells={(12, 0): "?"}), "label", {}, ("refused", "a", 14, "missing")),
    "numeric column with one stray token": (table(cells={(3, 0): "unknown"}), "label", {}, ("refused", "a", 5, "1 other cell")),
    "numeric column with three stray tokens": (table(cells={(3, 0): "x", (7, 0): "x", (9, 0): "y"}), "label", {},
                                               ("refused", "a", 5, "3 other cell")),
    "identifier column": (table(header=("a", "b", "name", "label"), extra=None,
                                cells={(i, 2): NAMES[i] for i in range(ROWS)}), "label", {}, ("refused", "name", None, "identifier")),
    "row index column": (table(header=("id", "b", "c", "label"), cells={(i, 0): str(i + 1) for i in range(ROWS)}),
                         "label", {}, ("refused", "id", None, "row index")),
    "identifier column dropped": (table(header=("a", "b", "name", "label"), cells={(i, 2): NAMES[i] for i in range(ROWS)}),
                                  "label", {"drop": ["name"]}, dict(classes=("0", "1"), features=("a", "b"))),
    "drop an unknown column": (table(), "label", {"drop": ["zzz"]}, ("refused", "zzz", None, "does not have")),
    "drop the target": (table(), "label", {"drop": ["label"]}, ("refused", "label", None, "cannot be dropped")),
    "drop every feature": (table(), "label", {"drop": ["a", "b", "c"]}, ("refused", "label", None, "no feature column")),
    "categorical with a few numbers": (table(cells={(i, 2): "1" for i in range(0, ROWS, 7)}), "label", {},
                                       dict(features=("a", "b", "c=1", "c=x", "c=y"))),
    "huge values": (table(cells={(i, 0): f"{1e308 if i % 2 else -1e308:g}" for i in range(ROWS)}), "label", {},
                    dict(classes=("0", "1"), finite_spread="a")),
    "1e200 values": (table(cells={(i, 1): f"{(i + 1) * 1e200:g}" for i in range(ROWS)}), "label", {}, dict(finite_spread="b")),
    "inf cell": (table(cells={(5, 1): "inf"}), "label", {}, ("refused", "b", 7, "not a finite number")),
    "-inf cell": (table(cells={(0, 0): "-inf"}), "label", {}, ("refused", "a", 2, "not a finite number")),
    "1e400 cell": (table(cells={(20, 0): "1e400"}), "label", {}, ("refused", "a", 22, "not a finite number")),
    "whitespace around numbers": (table(cells={(1, 0): " 3.5 ", (2, 1): "4 "}), "label", {}, dict(features=("a", "b", "c=x", "c=y"))),
    "scientific notation": (table(cells={(1, 0): "1e-3", (2, 0): "-2.5E2"}), "label", {}, dict(features=("a", "b", "c=x", "c=y"))),
    "quoted cell with a comma": (table(cells={(i, 2): ("a,b" if i % 2 else "c") for i in range(ROWS)}), "label", {},
                                 dict(features=("a", "b", "c=a,b", "c=c"))),
    "constant column kept": (table(cells={(i, 1): "5" for i in range(ROWS)}), "label", {}, dict(features=("a", "b", "c=x", "c=y"))),
    "two rows": (table(rows=2), "label", {}, ("refused", None, None, "too few rows")),
    "class with 2 rows": (table([("a" if i < 2 else "b") for i in range(ROWS)]), "label", {}, ("refused", None, None, "'a': 2")),
    "class with 3 rows": (table([("a" if i < 3 else "b") for i in range(ROWS)]), "label", {}, dict(classes=("a", "b"))),
    "one class": (table(["1"] * ROWS), "label", {}, ("refused", None, None, "at least 2 classes")),
    "extra cell in a row": ("\n".join(line + ",9" if i == 4 else line for i, line in
                                      enumerate(table().splitlines())) + "\n", "label", {}, ("refused", None, 5, "5 cells")),
    "missing cell in a row": ("\n".join(line if i != 6 else line.rsplit(",", 1)[0] for i, line in
                                        enumerate(table().splitlines())) + "\n", "label", {}, ("refused", None, 7, "3 cells")),
    "blank lines skipped": (table().replace("\n", "\n\n", 3), "label", {}, dict(classes=("0", "1"))),
    "empty file": ("", "label", {}, ("refused", None, None, "is empty")),
    "header only": ("a,b,c,label\n", "label", {}, ("refused", None, None, "no rows")),
    "target not a column": (table(), "kind", {}, ("refused", "kind", None, "is not in")),
    "utf-8 BOM": ("\ufeff" + table(), "label", {}, dict(classes=("0", "1"))),
}
LATIN = table(cells={(i, 2): ("caf\u00e9" if i % 2 else "bar") for i in range(ROWS)})
TEST_CASES = {  # (train csv, test csv, expected)
    "test label never seen": (table(), table(with_label(3, "7"), rows=ROWS), ("refused", None, None, "never has")),
    "test category never seen": (table(), table(cells={(2, 2): "z"}), ("refused", "c", 4, "never has")),
    "test columns reordered": (table(), None, dict(classes=("0", "1"))),
    "test numeric cell not a number": (table(), table(cells={(6, 0): "abc"}), ("refused", "a", 8, "not a finite number")),
    "test label missing": (table(), table(with_label(1, "")), ("refused", "label", 3, "missing")),
    "test label 1.0 for train 1": (table([str(1 + i % 2) for i in range(ROWS)]),
                                   table([f"{1 + i % 2}.0" for i in range(ROWS)]), dict(classes=("1", "2"))),
    "test file other columns": (table(), table(header=("a", "b", "d", "label")), ("refused", None, None, "has columns")),
}


def reordered(text, order):
    """The same CSV with its columns in another order."""
    rows = list(csv.reader(io.StringIO(text)))
    idx = [rows[0].index(c) for c in order]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([[r[i] for i in idx] for r in rows])
    return out.getvalue()


def _write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def _cli(path, target, options, test_path=None, capsys=None):
    argv = ["train", "--csv", str(path), "--target", target, "--epochs", "1"]
    if options.get("drop"):
        argv += ["--drop", *options["drop"]]
    if options.get("encoding"):
        argv += ["--encoding", options["encoding"]]
    if test_path is not None:
        argv += ["--test-csv", str(test_path)]
    code = cli_main(argv)
    return code, capsys.readouterr().err.strip()


def _check_refusal(code, err, path, expected):
    _, column, line, words = expected
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert path.name in err, err
    if column is not None:
        assert repr(column) in err or column in err, err
    if line is not None:
        assert f"line {line}" in err or f":{line}:" in err, err
    assert words in err, err


def _check_dataset(ds, expected):
    if "classes" in expected:
        assert ds.label_names == expected["classes"]
    if "features" in expected:
        assert ds.feature_names == expected["features"]
    if "finite_spread" in expected:  # a huge-valued column standardized, not erased
        col = ds.feature_names.index(expected["finite_spread"])
        assert np.isfinite(ds.x_train).all() and np.std(ds.x_train[:, col]) > 0.5
    assert len(ds.x_train) + len(ds.x_val) + len(ds.x_test) >= 3


@pytest.mark.parametrize("case", sorted(CASES))
def test_csv_table(case, tmp_path, capsys):
    text, target, options, expected = CASES[case]
    path = _write(tmp_path, "data.csv", text)
    if isinstance(expected, tuple):
        _check_refusal(*_cli(path, target, options, capsys=capsys), path, expected)
    else:
        _check_dataset(from_csv(path, target, **options), expected)


@pytest.mark.parametrize("case", sorted(TEST_CASES))
def test_csv_table_with_a_test_file(case, tmp_path, capsys):
    train, test, expected = TEST_CASES[case]
    test = reordered(train, ("label", "c", "b", "a")) if test is None else test
    path, test_path = _write(tmp_path, "train.csv", train), _write(tmp_path, "test.csv", test)
    if isinstance(expected, tuple):
        code, err = _cli(path, "label", {}, test_path, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert "test.csv" in err or "y_test" in err, err
        _, column, line, words = expected
        if column is not None:
            assert repr(column) in err, err
        if line is not None:
            assert f"line {line}" in err, err
        assert words in err, err
    else:
        ds = from_csv(path, "label", test_csv=test_path)
        _check_dataset(ds, expected)
        reference = from_csv(path, "label", test_csv=_write(tmp_path, "same.csv", train))
        if case == "test columns reordered":  # the same rows in another column order: the same values
            np.testing.assert_array_equal(ds.x_test, reference.x_test)


def test_encodings(tmp_path, capsys):
    latin = _write(tmp_path, "latin.csv", LATIN, encoding="latin-1")
    code, err = _cli(latin, "label", {}, capsys=capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "latin.csv" in err and "--encoding" in err, err
    ds = from_csv(latin, "label", encoding="latin-1")
    assert "c=caf\u00e9" in ds.feature_names
    code, err = _cli(latin, "label", {"encoding": "klingon"}, capsys=capsys)
    assert code == 2 and "unknown encoding 'klingon'" in err, err


def test_the_table_has_at_least_60_cases():
    assert len(CASES) + len(TEST_CASES) + 3 >= 60


def test_a_continuous_target_is_refused_with_a_hint_and_class_codes_are_not(tmp_path):
    """Every distinct label is a class: an age or a price would be dozens of rare classes."""
    import csv as csv_module

    from dreg_jax.data import from_csv

    rng = np.random.default_rng(0)

    def table(name, target_values):
        path = tmp_path / name
        with open(path, "w", newline="") as f:
            w = csv_module.writer(f)
            w.writerow(["x", "target"])
            w.writerows([[float(rng.normal()), t] for t in target_values])
        return path

    ages = rng.integers(18, 90, 1500)
    with pytest.raises(ValueError, match=r"target 'target' looks continuous \(\d+ distinct numeric values in 1500 rows"):
        from_csv(table("ages.csv", ages), "target")
    with pytest.raises(ValueError, match="to predict a number, pass --task regression"):  # decimals: refused per cell
        from_csv(table("prices.csv", np.round(rng.gamma(2.0, 10.0, 300), 2)), "target")
    codes = from_csv(table("codes.csv", rng.integers(0, 26, 3000)), "target")  # 26 class codes, 3000 rows
    assert codes.num_classes == 26
    assert from_csv(table("small.csv", rng.integers(0, 3, 60)), "target").num_classes == 3
