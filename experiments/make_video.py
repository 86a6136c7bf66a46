r"""The video of one camera with a vertical line where the model hears the talker.

  python -m experiments.make_video --video cam01.mp4 --forward_csv test_forward.csv \
      --name conversation1_t3-cam01 --out cam01_asd.mp4

Video frame i gets row i of the camera (1/30 s frames; a video of another frame rate is refused
unless --allow_fps_mismatch; rows whose time is not their frame's, as when out of time order, are
refused as the evaluation refuses them). The line is drawn at column round(x * width) on frames
whose confidence is at least --threshold; the audio stream is copied. ffmpeg: `ffmpeg` on PATH,
else the one of the PyPI package imageio-ffmpeg.
"""

from absl import flags
from absl import logging

from asd_jax import video
import experiments

_VIDEO = flags.DEFINE_string("video", None, "Input video.", required=True)
_FORWARD_CSV = flags.DEFINE_string("forward_csv", None, "Forward or predict CSV.", required=True)
_NAME = flags.DEFINE_string("name", None, "Camera <sequence>-camNN (needed for a forward file).")
_OUT = flags.DEFINE_string("out", None, "Output video (its extension picks the container); not "
                           "the input video or the CSV.", required=True)
_THRESHOLD = flags.DEFINE_float("threshold", 0.5, "Draw on frames with confidence >= this, in "
                                "[0, 1] (0.5: evaluation's rule for a speaking frame).")
_LINE_WIDTH = flags.DEFINE_integer("line_width_px", 3, "Line width, px, >= 1.")
_CODEC = flags.DEFINE_string("video_codec", "libx264", "ffmpeg video encoder (libx264 with "
                             "--crf; ffv1 / libx264rgb lossless).")
_CRF = flags.DEFINE_integer("crf", 18, "libx264 quality, 0-51 (lower is better).")
_ALLOW_FPS = flags.DEFINE_bool("allow_fps_mismatch", False, "Map frame i to row i even when "
                               "the video is not 30 fps.")


def main(argv):
    del argv
    frames = video.overlay_from_csv(
        _VIDEO.value, _FORWARD_CSV.value, _NAME.value, _OUT.value, threshold=_THRESHOLD.value,
        line_width_px=_LINE_WIDTH.value, video_codec=_CODEC.value, crf=_CRF.value,
        allow_fps_mismatch=_ALLOW_FPS.value)
    logging.info("wrote %d frames to %s", frames, _OUT.value)


if __name__ == "__main__":
    experiments.run(main)
