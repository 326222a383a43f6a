"""Cells are read as text first: labels stay exact integers or exact text, numbers follow one
rule (no ``1_0``), formatted numbers and identifier columns are refused with the column, the
line and the fix, and every refusal is one line naming the file."""
import csv

import numpy as np
import pytest

from dreg_jax.cli import main
from dreg_jax.data import from_csv
from dreg_jax.preprocessing import is_number

from conftest import file_snapshot, one_line_refusal, write_csv


_write = write_csv


def _rows(n=60, label=lambda i: "ab"[i % 2], x2=None, seed=0):
    rng = np.random.default_rng(seed)
    return [[f"{rng.normal():.4f}", x2(i) if x2 else f"{rng.normal():.3f}", label(i)] for i in range(n)]


# name: (rows, from_csv keywords, expected): expected is ("labels", names) or ("refused", words)
CASES = {
    "ids past 2**53 stay distinct": (_rows(label=lambda i: str(9007199254740992 + i % 2)), {},
                                     ("labels", ("9007199254740992", "9007199254740993"))),
    "uint64 ids stay exact": (_rows(label=lambda i: str(12345678901234567891 + i % 2)), {},
                              ("labels", ("12345678901234567891", "12345678901234567892"))),
    "ids past uint64 stay exact": (_rows(label=lambda i: str(10 ** 30 + i % 2)), {},
                                   ("labels", (str(10 ** 30), str(10 ** 30 + 1)))),
    "negative ids sort numerically": (_rows(label=lambda i: ["-10", "2"][i % 2]), {}, ("labels", ("-10", "2"))),
    "1_0 is text, not 10": (_rows(label=lambda i: ["1_0", "10"][i % 2]), {}, ("labels", ("10", "1_0"))),
    "1.0 and 1 are one class": (_rows(label=lambda i: ["1.0", "1", "2"][i % 3]), {}, ("labels", ("1", "2"))),
    "exponent integers": (_rows(label=lambda i: ["1e3", "2000"][i % 2]), {}, ("labels", ("1000", "2000"))),
    "label 0.5 refused": (_rows(label=lambda i: ["0.5", "1"][i % 2]), {}, ("refused", ["'label'", "not a class label"])),
    "label 1e400 refused": (_rows(label=lambda i: ["1e400", "1"][i % 2]), {}, ("refused", ["'label'", "not a class label"])),
    "label NA refused": (_rows(label=lambda i: "NA" if i == 3 else "12"[i % 2]), {},
                         ("refused", ["'label'", "line 5", "missing"])),
    "cell 5_1 is not a number": (_rows(x2=lambda i: "5_1" if i == 4 else f"{i / 7:.3f}"), {},
                                 ("refused", ["'x2'", "line 6", "'5_1'"])),
    "cell 1,000 refused with the fix": (_rows(x2=lambda i: f"{1000 + i:,}"), {},
                                        ("refused", ["'x2'", "line 2", "1,000 -> 1000"])),
    "one 1,000 among numbers": (_rows(x2=lambda i: "1,000" if i == 10 else f"{i / 7:.3f}"), {},
                                ("refused", ["'x2'", "line 12", "'1,000'"])),
    "percent refused": (_rows(x2=lambda i: f"{i % 50}%"), {}, ("refused", ["'x2'", "10% -> 0.10"])),
    "currency refused": (_rows(x2=lambda i: f"${i % 9}"), {}, ("refused", ["'x2'", "$5 -> 5"])),
    "spaces in numbers are fine": (_rows(x2=lambda i: f" {i % 7} "), {}, ("labels", ("a", "b"))),
    "row index refused": (_rows(x2=lambda i: str(i + 1)), {}, ("refused", ["'x2'", "numbers the rows"])),
    "gapped ids refused": (_rows(x2=lambda i: str(3 * i + 100)), {}, ("refused", ["'x2'", "different integer in every row",
                                                                                 "--keep x2"])),
    "shuffled ids refused": (_rows(x2=lambda i: str((i * 37) % 61)), {}, ("refused", ["'x2'", "each once"])),
    "one id deleted refused": (_rows(x2=lambda i: str(i + 1 if i < 30 else i + 2)), {},
                               ("refused", ["'x2'", "--drop x2"])),
    "gapped ids kept with keep": (_rows(x2=lambda i: str(3 * i + 100)), {"keep": ["x2"]}, ("labels", ("a", "b"))),
    "ids dropped with drop": (_rows(x2=lambda i: str(i + 1)), {"drop": ["x2"]}, ("labels", ("a", "b"))),
    "repeated integers are a feature": (_rows(x2=lambda i: str(i % 13)), {}, ("labels", ("a", "b"))),
    "keep unknown column refused": (_rows(), {"keep": ["nope"]}, ("refused", ["--keep", "'nope'"])),
    "text id refused": (_rows(x2=lambda i: f"user{i}"), {}, ("refused", ["'x2'", "identifier", "--keep x2"])),
    "text id kept with keep": (_rows(n=24, x2=lambda i: f"user{i}"), {"keep": ["x2"]}, ("labels", ("a", "b"))),
    "inf cell": (_rows(x2=lambda i: "inf" if i == 2 else f"{i / 7:.3f}"), {}, ("refused", ["'x2'", "line 4", "finite"])),
    "huge cell": (_rows(x2=lambda i: "9" * 140000 if i == 5 else "1"), {}, ("refused", ["longer than 131072", "line 6"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_csv_rule(case, tmp_path):
    rows, kwargs, (kind, expected) = CASES[case]
    path = _write(tmp_path / "data.csv", ["x1", "x2", "label"], rows)
    before = file_snapshot(tmp_path)
    if kind == "labels":
        ds = from_csv(path, "label", **kwargs)
        assert ds.label_names == expected
        assert set(np.unique(ds.y_train)) == set(range(len(expected)))
    else:
        with pytest.raises(ValueError) as err:
            from_csv(path, "label", **kwargs)
        message = str(err.value)
        assert "\n" not in message and "data.csv" in message, message
        for word in expected:
            assert word in message, (word, message)
    assert file_snapshot(tmp_path) == before


def test_a_test_file_value_beyond_float32_names_file_column_and_line(tmp_path):
    train = _write(tmp_path / "train.csv", ["x1", "x2", "label"], _rows())
    test = _write(tmp_path / "test.csv", ["x1", "x2", "label"], _rows(n=20, x2=lambda i: "1e300" if i == 7 else "0.5"))
    with pytest.raises(ValueError, match=r"test file.*'x2' line 9 is 1e\+300, which standardizes beyond float32"):
        from_csv(train, "label", test_csv=test)
    huge = _write(tmp_path / "huge.csv", ["x1", "x2", "label"], _rows(x2=lambda i: "1e300" if i == 7 else f"{i / 7:.3f}"))
    assert np.isfinite(from_csv(huge, "label").x_train).all()  # in training it sets the scale: kept


def test_exact_labels_round_trip_through_predict(tmp_path, capsys):
    big = [str(9007199254740992 + k) for k in range(3)]
    rows = [[f"{k + 0.01 * i:.3f}", f"{(i * 7) % 5}", big[k]] for i in range(30) for k in range(3)]
    path = _write(tmp_path / "ids.csv", ["x1", "x2", "label"], rows)
    assert main(["train", "--csv", str(path), "--target", "label", "--hidden", "8", "--epochs", "3",
                 "--save-model", str(tmp_path / "M")]) == 0
    assert main(["predict", "--model", str(tmp_path / "M"), "--csv", str(path), "--out", str(tmp_path / "p.csv")]) == 0
    predicted = {r[1] for r in list(csv.reader(open(tmp_path / "p.csv")))[1:]}
    assert predicted <= set(big) and len(predicted) >= 2  # exact ids, never rounded to one


def test_cli_refusal_is_one_line_with_file_column_and_line(tmp_path, capsys):
    path = _write(tmp_path / "data.csv", ["x1", "x2", "label"], _rows(x2=lambda i: "1,000" if i == 10 else "1"))
    code = main(["train", "--csv", str(path), "--target", "label"])
    one_line_refusal(capsys, code, "data.csv", "'x2'", "line 12")


@pytest.mark.parametrize("text,number", [("12", True), ("-0.5", True), (".5", True), ("1e-3", True), ("+3.", True),
                                         ("inf", True), ("NaN", True), ("1_0", False), ("0x10", False), ("1,000", False),
                                         ("10%", False), ("", False), ("1e", False), ("--1", False), ("１２", False)])
def test_the_one_number_rule(text, number):
    assert is_number(text) is number


def test_activation_given_a_name_says_what_to_pass():
    import dreg_jax

    with pytest.raises(TypeError, match=r"Activation takes the function itself, got 'gelu': e.g. Activation\(nn.gelu\)"):
        dreg_jax.Activation("gelu")
