"""One process of the multi-process tests (tests/test_distributed.py): joins a jax.distributed
job on localhost (or runs alone with all the devices), trains a tiny grid with ``train_many``
and a tiny sweep with ``run_sweep`` on a mesh over every process's devices, and saves what it
got (OUT.npz: train_many's arrays; OUT.json: the sweep's rows by run id).

Usage: distributed_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES RESULTS OUT SEEDS CHUNK
(SEEDS 0: no sweep; CHUNK: run_sweep's chunk_size). A process count of 1 runs alone.
"""
import json
import sys

process_id, num_processes, port, local_devices = (int(a) for a in sys.argv[1:5])
results_path, out = sys.argv[5], sys.argv[6]
seeds, chunk = int(sys.argv[7]), int(sys.argv[8])

import jax  # noqa: E402

if num_processes > 1:
    from dreg_jax.engine import initialize_distributed

    initialize_distributed(f"localhost:{port}", num_processes, process_id, local_device_count=local_devices)
else:
    jax.config.update("jax_num_cpu_devices", local_devices)

import numpy as np  # noqa: E402

from dreg_jax.engine import EngineData, EngineOptions, RunHParams, SweepConfig, run_mesh, run_sweep, train_many  # noqa: E402
from dreg_jax.training.config import ModelConfig, RegularizerConfig, TrainConfig  # noqa: E402

mesh = run_mesh()
assert mesh.size == num_processes * local_devices, (mesh.size, jax.devices())
rng = np.random.default_rng(0)
x = rng.normal(size=(40, 5)).astype(np.float32)
y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
data = EngineData(x[:30], y[:30], x[30:], y[30:], np.zeros((0, 10, 5), np.float32))
config = TrainConfig(model=ModelConfig(hidden=(8,), activation="gelu"), regularizer=RegularizerConfig(kind="dreg"),
                     epochs=2, batch_size=16)
hp = RunHParams.stack([RunHParams(seed=s, learning_rate=1e-2, strength=1e-3) for s in range(6)])
options = EngineOptions(vmap_width=4)
final, curves = train_many(hp, data, config, 2, options, mesh)
records = []
if seeds:
    specs = SweepConfig(datasets=("iris",), activations=("gelu",), regularizers=("none", "dreg"), seeds=seeds,
                        epochs=2, hidden=(8,)).expand()
    records = run_sweep(specs, results_path, mesh=mesh, options=options, progress=False, report=False,
                        chunk_size=chunk)
np.savez(out + ".npz", **{f"final_{k}": v for k, v in final.items()}, **{f"curve_{k}": v for k, v in curves.items()})
with open(out + ".json", "w") as f:
    json.dump({r["run_id"]: {"metrics": r["metrics"], "curves": r["curves"], "layout": r.get("layout")}
               for r in records}, f, sort_keys=True)
print("worker done", process_id, flush=True)
