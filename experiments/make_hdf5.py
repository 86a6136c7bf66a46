r"""Builds the HDF5 feature store and its feature scaler from a TragicTalkers data root.

    python -m experiments.make_hdf5 --data_root data/synth --condition GT_GT \
        --features gcc_phat --out_dir data/hdf5/gcc_GT_GT [--layout compact]

Writes out_dir/development_dataset.h5 and out_dir/feature_scaler.h5. An interrupted build is
resumed by running the same command again (--restart starts over).
"""

from absl import flags

from asd_jax import constants
from asd_jax import features
from asd_jax.data import store
import experiments

_DATA_ROOT = flags.DEFINE_string("data_root", None, "TragicTalkers layout (real or synthetic).",
                                 required=True)
_CONDITION = flags.DEFINE_enum("condition", "GT_GT", constants.CONDITIONS, "Supervisory condition.")
_FEATURES = flags.DEFINE_enum("features", "gcc_phat", features.FEATURES, "Input features.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder of the store (created).", required=True)
_LAYOUT = flags.DEFINE_enum("layout", "reference", store.LAYOUTS,
                            "reference: a feature row per camera, as the reference's "
                            "store; compact: one per rig chunk, 11x smaller.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Audio chunks per jitted feature batch.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing complete store.")
_RESTART = flags.DEFINE_bool("restart", False, "Discard a partial build instead of resuming it.")


def main(argv):
    del argv
    store.build_store(_DATA_ROOT.value, _CONDITION.value, _FEATURES.value, _OUT_DIR.value,
                      layout=_LAYOUT.value, batch_size=_BATCH_SIZE.value, overwrite=_OVERWRITE.value,
                      restart=_RESTART.value)


if __name__ == "__main__":
    experiments.run(main)
