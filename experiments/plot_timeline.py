r"""Timeline plot of one camera: confidence and position over time, against the GT when given.

  python -m experiments.plot_timeline --forward_csv test_forward.csv \
      --name conversation1_t3-cam01 --gt_dir DATA/GT --out timeline.png
  python -m experiments.plot_timeline --forward_csv predictions.csv --out timeline.png

`--forward_csv` is a forward file (`experiments.forward`; --name picks the camera) or a CSV of
`experiments.predict` (one camera; --name titles the plot, and picks the GT file with --gt_dir).
`--out`'s extension picks the format: PNG, JPEG, SVG or PDF.
"""

from absl import app
from absl import flags
from absl import logging

from asd_jax import constants
from asd_jax import plots
import experiments

_FORWARD_CSV = flags.DEFINE_string("forward_csv", None, "Forward or predict CSV.", required=True)
_NAME = flags.DEFINE_string("name", None, "Camera <sequence>-camNN (needed for a forward file).")
_GT_DIR = flags.DEFINE_string("gt_dir", None, "GT directory (<sequence>/<rig>/..._GT.csv); "
                              "needs --name.")
_OUT = flags.DEFINE_string("out", "timeline.png", "Output file; its extension picks the format: "
                           ".png, .jpg/.jpeg (--width_px x --height_px px) or .svg, .pdf (the same "
                           "size at 100 px per inch); other extensions are refused.")
_IMAGE_WIDTH = flags.DEFINE_integer("image_width", constants.IMAGE_WIDTH_PX, "Width of the camera "
                                    "image, px (> 0): the scale of the position panel.")
_WIDTH_PX = flags.DEFINE_integer("width_px", 1600, f"Plot width, px, 1-{plots.MAX_SIZE_PX}.")
_HEIGHT_PX = flags.DEFINE_integer("height_px", 800, f"Plot height, px, 1-{plots.MAX_SIZE_PX}.")


def main(argv):
    del argv
    if _GT_DIR.value is not None and _NAME.value is None:
        raise app.UsageError("--gt_dir needs --name <sequence>-camNN: the camera whose GT file "
                             "<gt_dir>/<sequence>/<rig>/<sequence>-camNN_GT.csv is drawn")
    out = plots.timeline_from_files(_FORWARD_CSV.value, _NAME.value, _OUT.value, _GT_DIR.value,
                                    _IMAGE_WIDTH.value, (_WIDTH_PX.value, _HEIGHT_PX.value))
    logging.info("wrote %s", out)


if __name__ == "__main__":
    experiments.run(main)
