"""Peak memory of `dreg-jax predict` at 10^4, 10^5 and 10^6 rows: flat, because predict streams.

Each size runs `dreg-jax predict` in a fresh process on a CSV of that many rows (made here, with
the columns of a small model saved here) and reads the child's peak resident memory
(``ru_maxrss`` of the finished child). Prints one table: rows, CSV size, peak RSS, wall seconds,
and each peak as a ratio of the smallest one.

    python benchmarks/predict_memory.py [--sizes 10000 100000 1000000]
"""
from __future__ import annotations

import argparse
import csv
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np


def write_table(path, rows, seed=0, chunk=100_000):
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "c", "color", "label"])
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            a, b, c = rng.normal(size=(3, n))
            colors = rng.choice(["red", "green", "blue"], n)
            w.writerows(zip(np.char.mod("%.4f", a), np.char.mod("%.4f", b), np.char.mod("%.4f", c), colors,
                            np.where(a + b > 0, "yes", "no")))
    return path


def peak_of(argv):
    """(peak RSS in MiB, wall seconds) of a child process running ``argv``."""
    start = time.perf_counter()
    pid = subprocess.Popen(argv, stdout=subprocess.DEVNULL).pid
    _, status, usage = os.wait4(pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(argv)} exited with {status}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args()
    cli = [sys.executable, "-m", "dreg_jax.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        write_table(tmp / "train.csv", 400)
        subprocess.run(cli + ["train", "--csv", str(tmp / "train.csv"), "--target", "label", "--hidden", "16",
                              "--epochs", "3", "--save-model", str(tmp / "model")], check=True,
                       stdout=subprocess.DEVNULL)
        rows = []
        for n in args.sizes:
            data = write_table(tmp / f"rows{n}.csv", n, seed=n)
            peak, wall = peak_of(cli + ["predict", "--model", str(tmp / "model"), "--csv", str(data),
                                        "--out", str(tmp / f"out{n}.csv")])
            lines = sum(1 for _ in open(tmp / f"out{n}.csv")) - 1
            assert lines == n, (lines, n)
            rows.append((n, data.stat().st_size / 2**20, peak, wall))
    print(f"{'rows':>10} {'CSV MiB':>8} {'peak RSS MiB':>13} {'wall s':>7} {'peak / first':>13}")
    for n, size, peak, wall in rows:
        print(f"{n:>10} {size:>8.1f} {peak:>13.0f} {wall:>7.1f} {peak / rows[0][2]:>13.2f}")


if __name__ == "__main__":
    main()
