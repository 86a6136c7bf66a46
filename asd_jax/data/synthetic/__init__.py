"""A synthetic TragicTalkers-like dataset in exactly the real layout (SPEC section 1).

`synthesize(out_dir, num_dev=6, num_test=2, seconds=20, seed=0, snr_db=30, **options)` writes
it; `options` are `SynthConfig` fields (geometry, room, label simulation); `check_arguments`
checks those arguments without writing anything. Modules: speech (source-filter synthesiser),
scene (rigs, cameras, microphones, talker plans), render (pyroomacoustics image-source rooms,
diffuse noise), labels (ground truth, simulated visual detectors, energy VAD), sequence (one
sequence end to end), writer (the file tree).
"""

from asd_jax.data.synthetic.config import DetectorParams, SynthConfig
from asd_jax.data.synthetic.writer import check_arguments, synthesize

__all__ = ["DetectorParams", "SynthConfig", "check_arguments", "synthesize"]
