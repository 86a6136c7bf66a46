r"""Write the test-set forward file (`name,time,predicted x,confidence`, one row per camera and
1/30 s frame of every test chunk; asd_jax/forward.py) of a trained or converted model.

    python -m experiments.forward --workdir runs/gcc --out_csv test_forward.csv
    python -m experiments.forward --checkpoint ckpt/gcc_GT_GT_jax --data_root DIR --out_csv f.csv
    python -m experiments.forward --checkpoint runs/gcc/checkpoints/1750 --data_root DIR ...

With --workdir, --data_root defaults to the data root the run trained on (its config.json).
"""

import pathlib

from absl import app
from absl import flags
from absl import logging

from asd_jax import forward
from asd_jax.training import configs, loop
import experiments

_WORKDIR = flags.DEFINE_string("workdir", None, "Finished training workdir (its exported model/).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A model directory (converter output or "
                                  "finished workdir) or a training checkpoint "
                                  "<workdir>/checkpoints/<step>.")
_DATA_ROOT = flags.DEFINE_string("data_root", None, "TragicTalkers root (default with --workdir: "
                                 "the one in its config.json).")
_OUT_CSV = flags.DEFINE_string("out_csv", "test_forward.csv", "Output CSV.")
_SCALER = flags.DEFINE_string("scaler", None, "feature_scaler.h5 overriding the model's.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "Audio chunks per jitted call (x 11 cameras).")


def main(argv):
    del argv
    if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
        raise app.UsageError("give exactly one of --workdir and --checkpoint")
    if _WORKDIR.value is not None and not (pathlib.Path(_WORKDIR.value) / loop.CONFIG_FILE).is_file():
        workdir = pathlib.Path(_WORKDIR.value)
        raise FileNotFoundError(
            f"training workdir {workdir} does not exist" if not workdir.exists() else
            f"{workdir} is not a training workdir: it holds no {loop.CONFIG_FILE} (a model directory "
            "or a training checkpoint goes to --checkpoint)")
    data_root = _DATA_ROOT.value
    if data_root is None:
        config_json = pathlib.Path(_WORKDIR.value or "") / loop.CONFIG_FILE
        if _WORKDIR.value is not None:
            data_root = configs.TrainConfig.from_json(config_json).data_root
        if data_root is None:
            raise app.UsageError("give --data_root (with --workdir it defaults to the data root "
                                 "in the run's config.json, which a run trained from an HDF5 "
                                 "store alone does not have)")
        logging.info("data root %s (from %s)", data_root, config_json)
    rows = forward.forward(_CHECKPOINT.value or _WORKDIR.value, data_root, _OUT_CSV.value,
                           scaler_path=_SCALER.value, batch_size=_BATCH_SIZE.value)
    logging.info("wrote %d rows to %s", rows, _OUT_CSV.value)


if __name__ == "__main__":
    experiments.run(main)
