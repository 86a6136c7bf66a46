r"""The end-to-end demo (`make demo`): synthesize -> train `tiny` -> forward -> evaluate.

    python -m experiments.demo --workdir runs/demo
    python -m experiments.demo --workdir runs/demo_small --reduced

Prints a table of the trained CRNN against the centre and SRP-PHAT baselines and writes it to
workdir/demo_results.json and .md. Rerunning on the same workdir reuses the finished stages.
Flags that are set override the (full or reduced) demo settings.
"""

import dataclasses

from absl import flags
from absl import logging

from asd_jax import demo
import experiments

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Folder of all stages and results.")
_REDUCED = flags.DEFINE_bool("reduced", False, "A small setting (seconds on a CPU), for tests.")
_NUM_DEV = flags.DEFINE_integer("num_dev", None, "Development sequences to synthesize.")
_NUM_TEST = flags.DEFINE_integer("num_test", None, "Test sequences to synthesize.")
_SECONDS = flags.DEFINE_float("seconds", None, "Length of each synthetic sequence (s).")
_SEED = flags.DEFINE_integer("seed", None, "Seed of the data and of training.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Training epochs (default: the demo's).")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"],
                                   "Activation dtype of the CRNN (default float32).")


def main(argv):
    del argv
    config = demo.default_config(_REDUCED.value)
    overrides = {"num_dev": _NUM_DEV.value, "num_test": _NUM_TEST.value, "seconds": _SECONDS.value,
                 "seed": _SEED.value, "num_epochs": _EPOCHS.value,
                 "compute_dtype": _COMPUTE_DTYPE.value}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    logging.info("demo config: %s", config)
    demo.run_demo(_WORKDIR.value, config=config)


if __name__ == "__main__":
    experiments.run(main)
