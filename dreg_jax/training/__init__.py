"""Training: configs, train state, regularized train/eval steps and a simple fit loop."""
from dreg_jax.training.config import (
    DEFAULT_STRENGTHS,
    REGULARIZERS,
    ModelConfig,
    OptimizerConfig,
    RegularizerConfig,
    TrainConfig,
)
from dreg_jax.training.regularizers import (
    REGISTRY,
    LossTerms,
    Regularizer,
    get_regularizer,
)
from dreg_jax.training.fit import FitResult, epoch_batch_indices, fit
from dreg_jax.training.train import (
    LossContext,
    TrainState,
    build_model,
    build_optimizer,
    create_train_state,
    eval_step,
    loss_fn,
    train_step,
)
