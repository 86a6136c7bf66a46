"""Training: the loss, the train state and steps, the schedule, folds and the training loop.

The numeric parts (`asdl_loss`, `train_step`, `eval_step`, the schedule) are pure; the loop
(`train_and_evaluate`) and cross-validation (`cross_validate`) own files, checkpoints and logging.
"""

from asd_jax.training.loss import asdl_loss
from asd_jax.training.configs import TrainConfig, get_config, paper_gcc, paper_salsa, tiny
from asd_jax.training.crossval import cross_validate
from asd_jax.training.folds import Fold, cross_validation_folds
from asd_jax.training.loop import NonFiniteLossError, train_and_evaluate
from asd_jax.training.schedule import learning_rate_for_epoch
from asd_jax.training.state import TrainState, create_optimizer, create_train_state
from asd_jax.training.steps import eval_step, predict, train_step

__all__ = [
    "asdl_loss", "TrainConfig", "get_config", "paper_gcc", "paper_salsa", "tiny", "cross_validate",
    "Fold", "cross_validation_folds", "NonFiniteLossError", "train_and_evaluate",
    "learning_rate_for_epoch", "TrainState", "create_optimizer", "create_train_state",
    "eval_step", "predict", "train_step",
]
