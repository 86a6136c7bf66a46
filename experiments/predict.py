r"""Predict with a trained or converted checkpoint on a recording of the array it was trained on.

    python -m experiments.predict --checkpoint DIR --audio rec.wav --camera 6 --out_csv rows.csv
    python -m experiments.predict --checkpoint DIR --audio 01.wav,02.wav,...,16.wav --camera 6 \
        --rig 2 --image_width 2448 --resample
    python -m experiments.predict --checkpoint DIR --audio rec.wav --camera all --out_csv all.csv

Writes `time,predicted x,confidence` (and `x_px` with --image_width) per 1/30 s frame for one
camera; for several (`--camera 1,6,11` or `all`, one pass) a forward file
`name,time,predicted x,confidence` with names `<--name>-camNN`.
The recording must have the training array's geometry and microphone order, and x is the
position in that rig's camera --camera; on another array the positions are meaningless
(`asd_jax/predict.py`).
"""

from absl import app
from absl import flags
from absl import logging

from asd_jax import features
from asd_jax import predict
import experiments

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A model directory (converter output or "
                                    "finished training workdir) or a training checkpoint "
                                    "<workdir>/checkpoints/<step>.", required=True)
_AUDIO = flags.DEFINE_list("audio", None, "One 16-channel WAV, or 16 mono WAVs in microphone "
                             "order (comma-separated).", required=True)
_CAMERA = flags.DEFINE_string("camera", None, "Camera within the rig, 1..11; or several, "
                              "comma-separated, or 'all' (one pass, a forward file).", required=True)
_RIG = flags.DEFINE_enum("rig", "1", ["1", "2"], "Rig of the camera (rig 2: cam12..cam22); "
                           "only names the camera, the model sees the camera within its rig.")
_NAME = flags.DEFINE_string("name", None, "With several cameras: rows are named <name>-camNN "
                            "(default: the audio file's name, or the mono files' folder).")
_OUT_CSV = flags.DEFINE_string("out_csv", "predictions.csv", "Output CSV.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "2-s chunks per jitted call.")
_RESAMPLE = flags.DEFINE_bool("resample", False, "Resample audio that is not at 48 kHz.")
_IMAGE_WIDTH = flags.DEFINE_integer("image_width", None, "Add an x_px column for this image width (one camera only).")
_FEATURES = flags.DEFINE_enum("features", None, features.FEATURES, "Expected feature type "
                                "(error if the checkpoint's differs).")
_SCALER = flags.DEFINE_string("scaler", None, "feature_scaler.h5 to use instead of the "
                                "checkpoint's.")


def main(argv):
    del argv
    try:
        cameras = predict.parse_cameras(_CAMERA.value)
    except ValueError as e:
        raise app.UsageError(f"--camera: {e}") from None
    rig = int(_RIG.value)
    rows = predict.predict_to_csv(
        _CHECKPOINT.value, _AUDIO.value, cameras, _OUT_CSV.value, name=_NAME.value, rig=rig,
        features=_FEATURES.value, scaler_path=_SCALER.value, resample=_RESAMPLE.value,
        batch_size=_BATCH_SIZE.value, image_width=_IMAGE_WIDTH.value)
    names = [predict.camera_name(c, rig) for c in ([cameras] if isinstance(cameras, int) else cameras)]
    logging.info("wrote %d rows for %s (rig %s) to %s", rows, ", ".join(names), rig, _OUT_CSV.value)


if __name__ == "__main__":
    experiments.run(main)
