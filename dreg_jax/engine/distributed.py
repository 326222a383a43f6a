"""Sweeps over several processes on JAX's own distributed runtime (``jax.distributed``).

A multi-process sweep is one program per block whose run axis is sharded over every
process's devices (:func:`dreg_jax.engine.run_mesh` after :func:`initialize`). The rules that
make it run, and run right:

* **Same host arrays, local shards.** Every process computes the same plan and holds the same
  host arrays; :func:`dreg_jax.engine.grid.place` builds each process's own shards with
  ``jax.make_array_from_callback`` (no transfer between processes, no collective: safe in the
  compile threads).
* **Collectives in one order, on the main thread.** Fetching a block's results
  (``process_allgather``: every process gets every run) and the plan below are the only
  collectives; the sweep issues them from the main thread in the plan's order on every process.
* **One writer, one planner.** Only process 0 reads and writes the results file (and holds its
  lock). It sends the pending run ids and the finished rows to the others
  (:func:`broadcast_json`), so a process that sees another file, or none, never plans on its
  own. Every process then checks that its runs and its plan are process 0's
  (:func:`check_agreement`); a process started with another command stops them all with a
  message, rather than training other runs.
* **A failure stops every process.** Process 0's errors before the plan (a locked or unwritable
  results file) are sent to the others, which raise the same message; a process that dies later
  is detected by JAX's coordination service, which ends the others (its heartbeat timeout).
  Rows are appended whole after each chunk, so a restart of every process resumes where the
  file ends (:mod:`dreg_jax.engine.sweep`).
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_count: int | None = None) -> None:
    """Joins this process to a multi-process JAX job (idempotent).

    Args:
      coordinator_address: ``host:port`` of process 0's coordination service. None: JAX detects
        the cluster (SLURM, Open MPI, TPU pods, Kubernetes; ``jax.distributed.initialize()``
        without arguments).
      num_processes: how many processes take part (None: detected).
      process_id: this process's index, 0 .. num_processes - 1 (None: detected).
      local_device_count: CPU only: how many CPU devices this process exposes (default JAX's,
        one); must be set before JAX starts its backend.

    On a CPU the cross-process collectives use Gloo (JAX's CPU implementation).
    """
    if jax.distributed.is_initialized():
        return
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", int(local_device_count))
    if (os.environ.get("JAX_PLATFORMS") or "cpu").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def spans_processes(mesh) -> bool:
    """True when ``mesh`` holds devices of other processes."""
    return mesh is not None and mesh.is_multi_process


def broadcast_json(value):
    """``value`` (JSON-able, given on process 0; ignored elsewhere) on every process.

    A collective: every process calls it at the same point of the program."""
    from jax.experimental import multihost_utils

    source = jax.process_index() == 0
    payload = json.dumps(value, sort_keys=True, allow_nan=False).encode() if source else b""
    size = int(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray([len(payload)], np.int64)))[0])
    buffer = np.frombuffer(payload, np.uint8) if source else np.zeros(size, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer)) if size else buffer
    return json.loads(bytes(received.astype(np.uint8)).decode())


def digest(value) -> np.ndarray:
    """32 bytes that identify ``value`` (its canonical JSON)."""
    text = json.dumps(value, sort_keys=True, allow_nan=False, default=str)
    return np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)


def check_agreement(value, what: str) -> None:
    """Raises on every process unless every process passes the same ``value`` (a collective)."""
    from jax.experimental import multihost_utils

    mine = digest(value)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    differ = [i for i in range(every.shape[0]) if not np.array_equal(every[i], every[0])]
    if differ:
        raise RuntimeError(
            f"process(es) {differ} have other {what} than process 0: every process of a distributed "
            "sweep must run the same command (same grid, same data, same dreg_jax version)")
