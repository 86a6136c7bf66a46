"""Fixed facts of the TragicTalkers recordings and of the reference pipeline (SPEC sections 1-3 and 9),
and the file names every run directory, model directory and feature store shares.

Units are in the names: samples, Hz, frames (video frames at 30 fps unless said otherwise), px.
"""

SAMPLE_RATE_HZ = 48_000
CHUNK_SECONDS = 2
CHUNK_SAMPLES = SAMPLE_RATE_HZ * CHUNK_SECONDS  # 96000
VIDEO_FPS = 30
CHUNK_VIDEO_FRAMES = VIDEO_FPS * CHUNK_SECONDS  # 60 labelled frames per chunk
N_MICS = 16

# STFT front end shared by all features.
N_FFT = 512
HOP_SAMPLES = 100
N_STFT_FRAMES = 1 + CHUNK_SAMPLES // HOP_SAMPLES  # 961 centred frames
N_FEATURE_FRAMES = 960  # after the static 961 -> 960 frame selection
N_FEATURE_BINS = 64
N_MELS = 64
MEL_FMIN_HZ = 40.0
MEL_FMAX_HZ = 24_000.0
SPEED_OF_SOUND_M_S = 343.0
GCC_MAX_LAG = 32  # lags -32..31 kept
SALSA_CUTOFF_HZ = 6_000.0

# Cameras and image geometry.
IMAGE_WIDTH_PX = 2448
N_CAMERAS_PER_RIG = 11
RIGS = ("01", "02")
RIG_CAMERAS = {
    "01": tuple(f"cam{k:02d}" for k in range(1, 12)),
    "02": tuple(f"cam{k:02d}" for k in range(12, 23)),
}
RIG_MICS = {
    "01": tuple(f"{k:02d}" for k in range(1, 17)),
    "02": tuple(f"{k:02d}" for k in range(23, 39)),
}

# Supervisory conditions: <position pseudo-labels>_<voice-activity labels>.
CONDITIONS = (
    "GT_GT", "GT_VAD", "ASC_GT", "ASC_VAD",
    "ASC(s)_GT", "ASC(s)_VAD", "TalkNet_GT", "TalkNet_VAD",
)

TEST_SEQUENCES = (
    "conversation1_t3", "femalemonologue2_t3", "interactive1_t2",
    "interactive4_t3", "malemonologue2_t3",
)

# Evaluation tolerances in pixels: 2 and 5 degrees at the image centre.
TOLERANCE_2DEG_PX = 89
TOLERANCE_5DEG_PX = 222

# File names inside a training workdir, a model directory (README, Model) and a feature store.
CONFIG_FILE = "config.json"  # the run's or model's settings
MODEL_DIR = "model"  # the exported Orbax checkpoint of params and batch_stats
SCALER_FILE = "feature_scaler.h5"  # the training set's feature scaler (the reference's name)
METRICS_FILE = "metrics.jsonl"  # a training run's log, one JSON object per epoch


def camera_rig(camera: str) -> str:
    """'cam07' -> '01', 'cam15' -> '02'. Raises ValueError for a name outside cam01..cam22."""
    for rig, cams in RIG_CAMERAS.items():
        if camera in cams:
            return rig
    raise ValueError(f"unknown camera {camera!r}: expected cam01..cam22")


def camera_index(camera: str) -> int:
    """Index of the camera's one-hot entry: cam01..cam11 -> 0..10, cam12..cam22 -> 0..10."""
    rig = camera_rig(camera)
    return RIG_CAMERAS[rig].index(camera)
