"""A grid of runs with the same structure as one compiled program, optionally sharded.

``train_many`` vmaps :func:`train_run` over a batch of :class:`RunHParams` and jits the
result (compiled once per structure, cached). With a ``mesh`` the run axis is sharded over
the mesh's ``"runs"`` axis (``NamedSharding(mesh, P("runs"))``) and the dataset replicated:
the same code uses 1 CPU, 8 GPUs or a TPU slice. Runs go through the program in
blocks of exactly ``options.vmap_width`` (rounded up to a multiple of the device count); the
last block is padded by repeating its last run, and the padding's results are dropped. One
width for every call makes a run's floating-point bits independent of how many runs share its
call, of the chunking and of the point a sweep was resumed from (a different vmap width can
change the last bits: XLA vectorizes differently).

Padded data (:mod:`dreg_jax.engine.buckets`) and runs of different lengths
(``RunHParams.epochs`` under the config's cap) share a program: the cache key is the config,
the class count and the arrays' shapes, never the data's values or a run's length.

Several processes (hosts): call :func:`dreg_jax.engine.distributed.initialize` (or
``jax.distributed.initialize()``) at the start of every process, with the same command on each,
then pass ``mesh=run_mesh()`` (every process's devices). Each process builds its own shards of a
block (:func:`place`), the program runs across all of them, and :func:`fetch` gives every
process every run's results; ``train_many`` returns the whole grid on every process, and
:func:`dreg_jax.engine.run_sweep` plans on process 0 and writes there only
(:mod:`dreg_jax.engine.distributed`).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import os
import pathlib
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dreg_jax.engine.distributed import spans_processes
from dreg_jax.engine.run import EngineData, EngineOptions, RunHParams, train_run
from dreg_jax.training.config import TrainConfig


def run_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"runs"`` over ``devices`` (default: every device of every host)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), ("runs",))


_LOCK = threading.Lock()


@functools.lru_cache(maxsize=16)
def _jitted(config: TrainConfig, num_classes: int, options: EngineOptions):
    many = jax.vmap(lambda hp, data: train_run(hp, data, config, num_classes, options),
                    in_axes=(0, None))
    return jax.jit(many)


# Compiled programs, least recently used first. Bounded: every executable holds JIT code
# mappings, and a study compiles ~200 of them (an unbounded cache ran LLVM out of memory).
_EXECUTABLES: collections.OrderedDict = collections.OrderedDict()
MAX_CACHED_EXECUTABLES = 8
_IN_FLIGHT: dict = {}  # key -> Event of a compilation under way in another thread


@dataclasses.dataclass
class CompileStats:
    """What a sweep spent compiling and running (printed at its end, :meth:`line`)."""

    programs: int = 0  # programs built (compiled or loaded from the persistent cache)
    compile_seconds: float = 0.0  # summed over the compile threads
    run_seconds: float = 0.0  # executing the programs (including copying results to the host)

    def line(self) -> str:
        return (f"compiled programs: {self.programs}, compile seconds: {self.compile_seconds:.1f}, "
                f"run seconds: {self.run_seconds:.1f}")


#: Everything this process compiled and ran through the engine (the studies print it last).
PROCESS_STATS = CompileStats()


#: Where :func:`enable_compilation_cache` keeps compiled programs (``$DREG_JAX_CACHE/xla``).
CACHE_DIR = pathlib.Path(os.environ.get("DREG_JAX_CACHE", pathlib.Path.home() / ".cache" / "dreg_jax"))


def enable_compilation_cache(path=None, min_compile_seconds: float = 1.0) -> pathlib.Path | None:
    """Persists compiled programs on disk, so a resumed or repeated sweep does not compile again.

    Keeps a cache directory the user already configured (``jax_compilation_cache_dir``);
    otherwise uses ``path`` (default ``$DREG_JAX_CACHE/xla``, ``~/.cache/dreg_jax/xla``).
    ``DREG_JAX_COMPILATION_CACHE=0`` turns it off. Returns the directory (None when off).
    """
    if os.environ.get("DREG_JAX_COMPILATION_CACHE", "1") == "0":
        return None
    current = jax.config.jax_compilation_cache_dir
    if current and path is None:
        return pathlib.Path(current)
    directory = pathlib.Path(path) if path is not None else CACHE_DIR / "xla"
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return directory


def _signature(tree):
    return tuple((a.shape, str(a.dtype), str(getattr(a, "sharding", None)))
                 for a in jax.tree_util.tree_leaves(tree))


#: Runs per compiled call when ``EngineOptions.vmap_width`` is None: on a CPU a wide block
#: gains little (the cores are busy at 8); on an accelerator a call costs about the same up to
#: thousands of runs, so the study's largest program (240 runs) runs in one call.
DEFAULT_VMAP_WIDTH = {"cpu": 8, "gpu": 256, "tpu": 256}


def block_width(options: EngineOptions, mesh: Mesh | None = None) -> int:
    """The vmap width of every call: ``options.vmap_width`` (default per backend,
    :data:`DEFAULT_VMAP_WIDTH`) rounded up to the mesh size."""
    width = options.vmap_width
    if width is None:
        width = DEFAULT_VMAP_WIDTH.get(jax.default_backend(), 256)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"vmap_width must be >= 1, got {width}")
    if mesh is not None and mesh.size > 1:
        width += (-width) % mesh.size
    return width


def run_blocks(hparams: RunHParams, width: int):
    """``hparams`` cut into blocks of exactly ``width`` runs (the last padded with its last run)."""
    num_runs = int(np.shape(hparams.seed)[0])
    if num_runs < 1:
        raise ValueError("no runs: hparams has an empty run axis")
    blocks = []
    for start in range(0, num_runs, width):
        block = jax.tree_util.tree_map(lambda a: a[start:start + width], hparams)
        short = width - int(np.shape(block.seed)[0])
        if short:
            block = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], short, axis=0)]), block)
        blocks.append(block)
    return blocks


def place(hparams: RunHParams, data: EngineData, mesh: Mesh | None = None):
    """Shards the run axis over the mesh and replicates the data (no-op without a mesh).

    On a mesh that spans processes every process holds the same host arrays and builds only its
    own devices' shards (``jax.make_array_from_callback``): nothing crosses processes and no
    collective is issued, so blocks can be placed from compile threads in any order."""
    if mesh is None or mesh.size == 1:
        return hparams, data
    if spans_processes(mesh):
        return (_from_host(hparams, NamedSharding(mesh, P("runs"))),
                _from_host(data, NamedSharding(mesh, P())))
    return (jax.device_put(hparams, NamedSharding(mesh, P("runs"))),
            jax.device_put(data, NamedSharding(mesh, P())))


def _from_host(tree, sharding):
    def one(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree_util.tree_map(one, tree)


def fetch(outputs, mesh: Mesh | None = None):
    """A program's outputs as numpy arrays holding every run, on every process.

    Across processes this is ``process_allgather``, a collective: call it from the main thread,
    at the same point of the plan on every process."""
    if spans_processes(mesh):
        from jax.experimental import multihost_utils

        return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(outputs, tiled=True))
    return jax.tree_util.tree_map(np.asarray, outputs)


def compile_grid(config: TrainConfig, num_classes: int, options: EngineOptions, hparams, data,
                 stats: CompileStats | None = None):
    """The compiled program for these (prepared) inputs; cached per structure and shapes.

    Safe to call from background threads, which lets a sweep compile the next programs while
    one runs. ``stats`` (optional) counts the program and its compile seconds.
    """
    key = (config, num_classes, options, _signature(hparams), _signature(data))
    while True:
        with _LOCK:
            if key in _EXECUTABLES:
                _EXECUTABLES.move_to_end(key)
                return _EXECUTABLES[key]
            pending = _IN_FLIGHT.get(key)
            if pending is None:  # this thread compiles it; others with the same key wait
                pending = _IN_FLIGHT[key] = threading.Event()
                break
        pending.wait()  # datasets of the same shapes share a program: compile it once
    try:
        t0 = time.perf_counter()
        program = _jitted(config, num_classes, options).lower(hparams, data).compile()
        with _LOCK:
            seconds = time.perf_counter() - t0
            for counter in {id(s): s for s in (stats, PROCESS_STATS) if s is not None}.values():
                counter.programs += 1
                counter.compile_seconds += seconds
            _EXECUTABLES[key] = program
            while len(_EXECUTABLES) > MAX_CACHED_EXECUTABLES:
                _EXECUTABLES.popitem(last=False)
    finally:
        with _LOCK:
            _IN_FLIGHT.pop(key).set()
    return program


def _check_one_strength(config: TrainConfig, hparams: RunHParams):
    """The runs' strengths live in ``RunHParams.strength`` (traced); a config strength that says
    otherwise would be silently ignored, so it is refused."""
    given = config.regularizer.strength
    if given is not None and not np.allclose(np.asarray(hparams.strength, np.float64), given):
        raise ValueError(
            f"RegularizerConfig.strength={given} but RunHParams.strength={np.asarray(hparams.strength).tolist()}: "
            "train_many trains every run at its RunHParams.strength; leave RegularizerConfig.strength "
            "unset (None) or pass the same value")


def train_many(hparams: RunHParams, data: EngineData, config: TrainConfig, num_classes: int,
               options: EngineOptions = EngineOptions(), mesh: Mesh | None = None):
    """Trains every run in ``hparams`` (leading axis = runs); returns numpy (final, curves).

    ``config.fold`` (a :class:`dreg_jax.training.config.Fold`) lets the runs differ in
    activation and regularizer (``hparams.activation_index``/``regularizer_index``).
    """
    config.validate()
    hparams.validate().check_fold(config)
    data.check(num_classes, config.task)
    if config.task == "regression" and np.any(np.asarray(hparams.label_noise) > 0):
        raise ValueError("label_noise flips class labels; a regression target has none: leave it at 0")
    _check_one_strength(config, hparams)
    num_runs = int(np.shape(hparams.seed)[0])
    width = block_width(options, mesh)
    outputs = []
    for block in run_blocks(hparams, width):
        block, placed = place(block, data, mesh)
        program = compile_grid(config, num_classes, options, block, placed)
        t0 = time.perf_counter()
        outputs.append(fetch(program(block, placed), mesh))
        with _LOCK:
            PROCESS_STATS.run_seconds += time.perf_counter() - t0
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a)[:num_runs], *outputs)
