r"""Write the test-set forward file (`name,time,predicted x,confidence`, one row per camera and
1/30 s frame of every test chunk; asd_jax/forward.py) of a trained or converted model.

    python -m experiments.forward --workdir runs/gcc --out_csv test_forward.csv
    python -m experiments.forward --checkpoint ckpt/gcc_GT_GT_jax --data_root DIR --out_csv f.csv
    python -m experiments.forward --checkpoint runs/gcc/checkpoints/1750 --data_root DIR ...

With --workdir, --data_root defaults to the data root the run trained on (its config.json).
"""

from absl import app
from absl import flags
from absl import logging

from asd_jax import forward
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
    data_root = _DATA_ROOT.value
    if _WORKDIR.value is not None:
        config_json = forward.workdir_config(_WORKDIR.value)  # checked with --data_root too
        if data_root is None:
            data_root = forward.workdir_data_root(_WORKDIR.value)
            logging.info("data root %s (from %s)", data_root, config_json)
    elif data_root is None:
        raise app.UsageError("give --data_root (with --workdir it defaults to the data root in "
                             "the run's config.json; a model directory or checkpoint records none)")
    rows = forward.forward(_CHECKPOINT.value or _WORKDIR.value, data_root, _OUT_CSV.value,
                           scaler_path=_SCALER.value, batch_size=_BATCH_SIZE.value)
    logging.info("wrote %d rows to %s", rows, _OUT_CSV.value)


if __name__ == "__main__":
    experiments.run(main)
