"""Write a synthetic TragicTalkers-like dataset.

  python -m experiments.synthesize --out_dir DIR [--num_dev 6 --num_test 2 --seconds 20
      --seed 0 --snr_db 30 --workers 1 --overwrite]
"""

from absl import flags, logging

from asd_jax.data.synthetic import synthesize
import experiments

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Data root to create.", required=True)
_NUM_DEV = flags.DEFINE_integer("num_dev", 6, "Development sequences.")
_NUM_TEST = flags.DEFINE_integer("num_test", 2, "Test sequences.")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Sequence length in seconds (minus up to 0.5 s).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed (an integer >= 0): the tree is a deterministic "
                             "function of the flags.")
_SNR_DB = flags.DEFINE_float("snr_db", 30.0, "Diffuse noise SNR in dB; inf for no noise.")
_MAX_ORDER = flags.DEFINE_integer("max_order", 24, "Cap on the image-source order.")
_MIC_RADIUS_M = flags.DEFINE_float("mic_radius_m", 0.20, "Radius of the 15-mic ring around mic 0, m.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Sequences simulated in parallel processes.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace a non-empty out_dir.")


def main(argv):
    del argv
    path = synthesize(_OUT_DIR.value, num_dev=_NUM_DEV.value, num_test=_NUM_TEST.value,
                      seconds=_SECONDS.value, seed=_SEED.value, snr_db=_SNR_DB.value,
                      overwrite=_OVERWRITE.value, workers=_WORKERS.value, max_order=_MAX_ORDER.value,
                      mic_radius_m=_MIC_RADIUS_M.value)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    experiments.run(main)
