"""Throughput of one grid trained by 1, 2 and 4 processes (jax.distributed on this machine, one
CPU device per process), and the share of each call spent gathering results across processes.

Each process trains the same grid with ``train_many``'s pieces on a mesh over every process's
device: the program is compiled and run once to warm up, then every block is timed twice, its
execution (``block_until_ready``) and its gather (``grid.fetch``, a ``process_allgather``).
Prints, per process count: runs/s (median of the repeats), the communication share (the gather,
which also waits for the slowest process's shard), and the ratio to one process. On a machine with fewer cores than processes the processes share cores,
and the ratio says so.

    python benchmarks/distributed_sweep.py [--processes 1 2 4] [--runs 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def worker(process_id: int, processes: int, port: int, runs: int, repeats: int):
    import jax

    if processes > 1:
        from dreg_jax.engine import initialize_distributed

        initialize_distributed(f"localhost:{port}", processes, process_id, local_device_count=1)
    import numpy as np

    from dreg_jax.engine import EngineData, EngineOptions, RunHParams, run_mesh
    from dreg_jax.engine.grid import block_width, compile_grid, fetch, place, run_blocks
    from dreg_jax.training.config import ModelConfig, RegularizerConfig, TrainConfig

    mesh = run_mesh() if processes > 1 else None
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 32)).astype(np.float32)
    y = (x[:, :4].sum(1) > 0).astype(np.int32)
    data = EngineData(x[:500], y[:500], x[500:], y[500:], np.zeros((0, 100, 32), np.float32))
    config = TrainConfig(model=ModelConfig(hidden=(64, 64), activation="gelu"),
                         regularizer=RegularizerConfig(kind="dreg"), epochs=3, batch_size=64)
    options = EngineOptions(vmap_width=8 * processes)
    hp = RunHParams.stack([RunHParams(seed=s, learning_rate=1e-3, strength=1e-3) for s in range(runs)])
    blocks = [place(b, data, mesh) for b in run_blocks(hp, block_width(options, mesh))]
    program = compile_grid(config, 2, options, *blocks[0])
    fetch(program(*blocks[0]), mesh)  # warm
    totals = []
    for _ in range(repeats):
        run_s = gather_s = 0.0
        for block in blocks:
            t0 = time.perf_counter()
            out = jax.block_until_ready(program(*block))
            t1 = time.perf_counter()
            fetch(out, mesh)
            gather_s += time.perf_counter() - t1
            run_s += t1 - t0
        totals.append((run_s, gather_s))
    if process_id == 0:
        print(json.dumps({"runs": runs, "repeats": totals}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", type=int, nargs=3, help=argparse.SUPPRESS)  # id, processes, port
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.runs, args.repeats)
        return
    import numpy as np

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    rows = []
    for n in args.processes:
        port = _free_port()
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), str(n), str(port), "--runs",
                                   str(args.runs), "--repeats", str(args.repeats)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for i in range(n)]
        outs = [p.communicate()[0].decode() for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"{n} processes: a worker failed (exit codes {[p.returncode for p in procs]})")
        result = json.loads([line for line in outs[0].splitlines() if line.startswith("{")][-1])
        totals = np.asarray(result["repeats"])  # (repeats, [run s, gather s])
        seconds = totals.sum(1)
        median = float(np.median(seconds))
        rows.append((n, result["runs"] / median, float(np.median(totals[:, 1] / seconds))))
    base = rows[0][1]
    print(f"cores: {os.cpu_count()}; grid: {args.runs} runs (MLP 64x64, DREG, 3 epochs, 500 rows); "
          f"one CPU device per process; median of {args.repeats}")
    print(f"{'processes':>9} {'runs/s':>9} {'gather share':>13} {'ratio to 1':>11}   (gather: the allgather and the "
          "wait for the slowest process)")
    for n, rate, share in rows:
        print(f"{n:>9} {rate:>9.1f} {100 * share:>12.1f}% {rate / base:>11.2f}")


if __name__ == "__main__":
    main()
