r"""Train the CRNN (or resume an interrupted run: the same command on the same workdir).

    python -m experiments.train --data_root DIR --workdir runs/gcc --config paper_gcc
    python -m experiments.train --data_root DIR --workdir runs/cv --config paper_gcc --fold all
    python -m experiments.train --workdir runs/gcc --config_json runs/gcc/config.json
    python -m experiments.train --workdir runs/gcc      # resumes from runs/gcc/config.json
    python -m experiments.train --workdir runs/cv       # resumes the run of every fold (--fold all)
    python -m experiments.train --workdir runs/cv2 --config_json runs/cv/config.json  # its folds again

Several hosts: run the same command on each with `--distributed auto` (TPU pods, SLURM, MPI,
Kubernetes) or with `--coordinator_address host0:1234 --num_processes N --process_id i`; the
global batch is split over every device of every host (asd_jax/distributed.py).

Flags that are set override the preset (or the config.json; --config and --config_json together
are refused); the result is written to
workdir/config.json. A paper preset with --features or --condition takes the learning rate of the
released run of that pair (asd_jax.training.configs.RELEASED_LEARNING_RATES) unless --lr is set.
A workdir holding another run's config.json is refused.
"""

import os

from absl import app
from absl import flags

from asd_jax import constants
from asd_jax import distributed
from asd_jax import features
from asd_jax.training import configs, crossval, loop
import experiments

_CONFIG = flags.DEFINE_enum("config", "paper_gcc", sorted(configs.PRESETS), "Preset.")
_CONFIG_JSON = flags.DEFINE_string("config_json", None, "Start from this config.json instead of a "
                                   "preset (reproduces that run); not with --config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config, checkpoints, metrics, "
                               "model).", required=True)
_DATA_ROOT = flags.DEFINE_string("data_root", None, "TragicTalkers root (the layout of README, Data).")
_HDF5_DIR = flags.DEFINE_string("hdf5_dir", None, "Feature store directory; features are "
                                "computed on the fly when unset.")
_CONDITION = flags.DEFINE_enum("condition", None, constants.CONDITIONS, "Supervisory condition.")
_FEATURES = flags.DEFINE_enum("features", None, features.FEATURES, "Input features.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Number of epochs.")
_LR = flags.DEFINE_float("lr", None, "Initial learning rate.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch size.")
_SEED = flags.DEFINE_integer("seed", None, "Seed (initialisation, data order, folds).")
_FOLD = flags.DEFINE_string("fold", None, "Cross-validation fold 0..num_folds-1 (0..4 with the "
                            "presets' 5 folds), or 'all' for the run of every fold with averaged "
                            "curves; unset trains on every sequence.")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", None, list(configs.COMPUTE_DTYPES),
                                   "Activation dtype (parameters stay float32).")
_DROP_LAST = flags.DEFINE_bool("drop_last", None, "Drop the last, partial batch of every epoch "
                                "(fixed when a run starts; needed with several hosts when it does "
                                "not split over all devices).")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every_steps", None, "Also checkpoint every "
                                         "this many steps inside an epoch (0: epoch ends only).")

_DISTRIBUTED = flags.DEFINE_enum("distributed", "off", list(distributed.MODES), "off: one process "
                                 "(unless --coordinator_address is set); auto: join the cluster "
                                 "the platform describes.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 of a "
                                   "multi-process job.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


def main(argv):
    del argv
    # The flags are checked before joining a cluster: a wrong one fails at once, on its own.
    config, fold = configs.starting_config(
        _WORKDIR.value, _CONFIG_JSON.value, _CONFIG.value if flags.FLAGS["config"].present else None,
        _FEATURES.value, _CONDITION.value, _FOLD.value)
    if fold is not None and fold != "all" and not fold.isdigit():  # its range: TrainConfig's check
        raise app.UsageError(f"--fold must be a fold number or 'all', got {fold!r}")
    # Absolute in config.json, so that the workdir resumes from any directory.
    data_root, hdf5_dir = (None if v is None else os.path.abspath(v)
                           for v in (_DATA_ROOT.value, _HDF5_DIR.value))
    config = config.replace(
        data_root=data_root, hdf5_dir=hdf5_dir, condition=_CONDITION.value,
        features=_FEATURES.value, num_epochs=_EPOCHS.value, learning_rate=_LR.value,
        batch_size=_BATCH_SIZE.value, seed=_SEED.value, compute_dtype=_COMPUTE_DTYPE.value,
        checkpoint_every_steps=_CHECKPOINT_EVERY.value, drop_last=_DROP_LAST.value,
        fold=int(fold) if fold is not None and fold != "all" else None)
    try:
        distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    if fold == "all":
        crossval.cross_validate(config, _WORKDIR.value)
    else:
        loop.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    experiments.run(main)
