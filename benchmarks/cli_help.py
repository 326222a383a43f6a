"""How long `dreg-jax --help` takes in a fresh process (the top level imports no JAX), beside
`dreg-jax --version`, a command's own `--help` (which builds every option and imports JAX) and a
bare `python -c pass` for the interpreter's own start.

Usage: python benchmarks/cli_help.py [--repeats 9]

Medians over interleaved repeats (the commands take turns, so a noisy moment hits all alike).
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    exe = str(pathlib.Path(sys.executable).with_name("dreg-jax"))
    commands = {"python -c pass": [sys.executable, "-c", "pass"], "dreg-jax --help": [exe, "--help"],
                "dreg-jax --version": [exe, "--version"], "dreg-jax tune --help": [exe, "tune", "--help"]}
    seconds = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["python -c pass"])
    print(f"| command | median seconds ({args.repeats} fresh processes) | x python start |")
    print("|---|---|---|")
    for name, values in seconds.items():
        print(f"| `{name}` | {statistics.median(values):.3f} | {statistics.median(values) / base:.1f} |")


if __name__ == "__main__":
    main()
