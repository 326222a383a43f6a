"""A run as data: :class:`RunSpec` (dataset, config, seed, fraction, noise) and its ``run_id``.

The id is the SHA-256 of the spec's canonical JSON (first 16 hex); a user model enters it as
``"<Class>@<fingerprint>"`` of its code (:mod:`dreg_jax.engine.identity`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json


from dreg_jax._checks import check_choice
from dreg_jax.data.registry import FEATURIZERS, USER_DATASETS, check_dataset, dataset_task
from dreg_jax.engine.identity import model_identity
from dreg_jax.engine.run import RunHParams
from dreg_jax.training.config import (
    OptimizerConfig,
    TrainConfig,
)

RESULTS_VERSION = 1
#: Config fields added after RESULTS_VERSION 1, left out of the run_id hash while they hold
#: these defaults, so results written before a field existed are still found on resume.
_LATER_DEFAULTS = (  # (path to the mapping, field, default)
    (("config", "regularizer"), "strength_schedule", "constant"),
    (("config", "regularizer"), "warmup_fraction", 0.25),
    (("config", "regularizer"), "noise_representation", "penultimate"),
    ((), "featurizer", "hashed"),
    ((), "validation_fraction", 0.0),
    (("config", "model"), "module", None),
    (("config", "model"), "jacobian_layers", []),
    (("config",), "fold", None),  # set only on programs, never on a run's own config
    (("config", "regularizer"), "weight_decay_reading", "times_lr"),
    (("config", "regularizer"), "spectral_norm_head", True),
    (("config", "regularizer"), "dreg_output_layer", False),
    (("config",), "class_weight", "none"),
    (("config",), "task", "classification"),
)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    dataset: str
    config: TrainConfig = TrainConfig()
    seed: int = 0
    data_fraction: float = 1.0
    label_noise: float = 0.0
    input_noise: float = 0.0
    featurizer: str = "hashed"  # text datasets: "hashed" n-grams or "minilm" (frozen encoder)
    validation_fraction: float = 0.0  # built-in sets: training share held out for validation

    def validate(self) -> "RunSpec":
        check_dataset(self.dataset)
        self.config.validate()
        if not 0.0 < self.data_fraction <= 1.0:
            raise ValueError(f"data_fraction must be in (0, 1], got {self.data_fraction}")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")
        if self.input_noise < 0.0:
            raise ValueError(f"input_noise must be >= 0, got {self.input_noise}")
        check_choice("featurizer", self.featurizer, FEATURIZERS)
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.validation_fraction and self.dataset in USER_DATASETS:
            raise ValueError(f"{self.dataset!r} is your own dataset: its validation split comes from "
                             "from_arrays/from_csv; leave validation_fraction at 0")
        task = dataset_task(self.dataset)
        if task != self.config.task:
            raise ValueError(f"{self.dataset!r} is a {task} dataset and the run's task is {self.config.task!r}: set "
                             f"task={task!r} (--task {task})" + (" or build the data with task='regression'"
                                                                 if self.config.task == "regression" else ""))
        if task == "regression" and self.label_noise:
            raise ValueError("label_noise flips class labels; a regression target has none: leave it at 0")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        return self

    def to_dict(self) -> dict:
        """Plain JSON values; a user module is recorded as ``"<Class>@<fingerprint>"`` of what it
        computes (:mod:`dreg_jax.engine.identity`), so an edit to its code changes the run id."""
        spec = self
        module = self.config.model.module
        if module is not None and not isinstance(module, str):
            model = dataclasses.replace(self.config.model, module=model_identity(module))
            spec = dataclasses.replace(self, config=dataclasses.replace(self.config, model=model))
        return json.loads(json.dumps(dataclasses.asdict(spec)))

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        return cls(**{**d, "config": TrainConfig.from_dict(d["config"])})

    @property
    def run_id(self) -> str:
        canonical = json.dumps({"v": RESULTS_VERSION, **canonical_spec(self.to_dict(), copy=False)}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def structure(self):
        """What must be equal for runs to be able to share one compiled program: everything
        but the numbers (traced per run) and the activation and regularizer kind (folded
        where the grouping cost model says so, :mod:`dreg_jax.engine.grouping`)."""
        c = self.config
        blank = dataclasses.replace(
            c, optimizer=OptimizerConfig(), model=dataclasses.replace(c.model, activation=""),
            regularizer=dataclasses.replace(c.regularizer, strength=None, kind=""),
        )
        return (self.dataset, self.featurizer, self.validation_fraction), blank

    def hparams(self, program: TrainConfig | None = None) -> RunHParams:
        """The run's traced values; ``program`` (a folded config) sets its fold indices. The
        run's epochs are traced too (a program's ``epochs`` is the cap of its longest run)."""
        program = program or self.config
        return RunHParams(seed=self.seed, learning_rate=self.config.optimizer.learning_rate,
                          strength=self.config.regularizer.resolved_strength(),
                          data_fraction=self.data_fraction, label_noise=self.label_noise,
                          input_noise=self.input_noise,
                          activation_index=program.activations.index(self.config.model.activation),
                          regularizer_index=program.regularizers.index(self.config.regularizer.kind),
                          epochs=self.config.epochs)


def canonical_spec(spec: dict, *, copy: bool = True) -> dict:
    """A spec dict (``RunSpec.to_dict()`` or a stored row's ``spec``) as the run id hashes it:
    fields added after ``RESULTS_VERSION`` 1 left out while they hold their defaults, so a row
    written before a field existed and today's spec of the same run compare equal. ``copy=False``
    edits ``spec`` in place (``run_id``, on a dict of its own)."""
    d = json.loads(json.dumps(spec)) if copy else spec
    for path, name, default in _LATER_DEFAULTS:
        fields = functools.reduce(lambda m, k: m.get(k, {}), path, d)
        if name in fields and fields[name] == default:
            del fields[name]
    regularizer = d["config"]["regularizer"]
    # the weight-decay reading acts on weight decay alone: for any other kind its new default
    # (per_step) hashes as the old one did (left out), so no other run's id moved with it
    if regularizer.get("kind") != "weight_decay" and regularizer.get("weight_decay_reading") == "per_step":
        del regularizer["weight_decay_reading"]
    return d
