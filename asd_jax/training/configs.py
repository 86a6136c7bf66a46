"""Training configurations: one Python preset per experiment, serialised to workdir/config.json.

A run is reproducible from its `config.json` alone (`TrainConfig.from_json`). The JSON holds
every field below plus `in_channels`, so that `asd_jax.checkpointing.load_model` can rebuild
the model from a training workdir (the top-level config.json of a cross-validation workdir
also has `"cross_validation": true`). Any other key is refused, so a misspelt field in a
hand-edited config.json is an error, not a silent default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Mapping

from asd_jax import constants
from asd_jax import features as features_lib
from asd_jax import textfiles
from asd_jax.training import schedule

PAPER_MODEL = {
    "conv_features": (64, 128, 256, 512),
    "gru_hidden": 256,
    "gru_layers": 2,
    "fc1_features": 32,
    "num_cameras": 11,
    "pooling": "avg",
}

TINY_MODEL = {
    "conv_features": (8, 16, 16, 32),
    "gru_hidden": 16,
    "gru_layers": 1,
    "fc1_features": 16,
    "num_cameras": 11,
    "pooling": "avg",
}

COMPUTE_DTYPES = ("float32", "bfloat16")
# Integer fields of TrainConfig and their least allowed value (prefetch 0: load synchronously).
_INT_FIELDS = {"batch_size": 1, "num_epochs": 1, "num_folds": 2, "checkpoints_to_keep": 1,
               "checkpoint_every_steps": 0, "lr_decay_start_epoch": 0, "seed": 0, "prefetch": 0}
_BOOL_FIELDS = ("drop_last", "cache_features", "double_gru_bias_updates")
# Keys of a config.json that are not TrainConfig fields, written by the code itself:
# `in_channels` and `training_data` (train_and_evaluate), `cross_validation` (cross_validate's
# top-level config).
EXTRA_KEYS = ("in_channels", "cross_validation", "training_data")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on.

    Data: `data_root` (SPEC section 1 layout) and, when set, `hdf5_dir` holding the feature
    store (else features are computed on the fly); `condition` picks development_<COND>.csv.
    `fold`: None trains on every development sequence (the paper's runs); 0..num_folds-1 trains
    on that cross-validation fold and reports validation losses per epoch.
    `features`: a name of `asd_jax.features.FEATURES`; `condition`: one of
    `asd_jax.constants.CONDITIONS`; `model`: `asd_jax.model.CRNN` fields (checked here).
    Learning rate: `learning_rate` is lr0 (finite, > 0); `lr_schedule` one of "reference"
    (compounding quirk, default), "exponential", "constant" (see `schedule`), decaying by
    `lr_decay_factor` in (0, 1] after epoch `lr_decay_start_epoch` (>= 0).
    `compute_dtype`: dtype of activations ("bfloat16" for mixed precision; parameters and the
    loss stay float32). `checkpoint_every_steps`: also checkpoint every so many steps inside an
    epoch (0: only at epoch ends). `drop_last`: drop the last, partial batch of an epoch (the
    reference keeps it). `double_gru_bias_updates`: train the folded GRU reset/update biases as
    the reference trains its twin ones (`asd_jax.model.gru_bias_update_scale`; the `asd_jax.model`
    docstring says why); False trains them at the plain rate.
    `cache_features`: hold the unnormalised features of the whole training (and validation)
    set in host memory after the first read; for small data sets only. Otherwise features
    (read from the store or computed on the fly) are made on the devices, each device those of
    its share of the batch: up to `prefetch` + 4 batches of them are in device memory (those
    waiting, the one being made, those of the steps in flight; at 32 examples ~126 MB a batch
    for 16 channels, ~950 MB for gcc_phat_all, split over the process's devices).
    `prefetch`: batches loaded ahead by a background thread (0: none).
    """

    features: str = "gcc_phat"
    condition: str = "GT_GT"
    model: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(PAPER_MODEL))
    compute_dtype: str = "float32"
    learning_rate: float = 1e-4
    lr_schedule: str = "reference"
    lr_decay_start_epoch: int = 30
    lr_decay_factor: float = 0.9
    batch_size: int = 32
    num_epochs: int = 50
    seed: int = 42
    fold: int | None = None
    num_folds: int = 5
    data_root: str | None = None
    hdf5_dir: str | None = None
    checkpoint_every_steps: int = 50
    checkpoints_to_keep: int = 3
    drop_last: bool = False
    prefetch: int = 2
    cache_features: bool = False
    double_gru_bias_updates: bool = True

    def __post_init__(self):
        if self.features not in features_lib.FEATURES:
            raise ValueError(f"features must be one of {features_lib.FEATURES}, got {self.features!r}")
        if self.condition not in constants.CONDITIONS:
            raise ValueError(f"condition must be one of {constants.CONDITIONS}, got {self.condition!r}")
        if self.lr_schedule not in schedule.SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {schedule.SCHEDULES}, got {self.lr_schedule!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        self._check_model()
        # Checked by type too: a float or bool here (a hand-edited config.json) would otherwise
        # pass the range checks and fail only inside training, after the workdir was written.
        for name, least in _INT_FIELDS.items():
            value = getattr(self, name)
            if not _is_int(value) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("data_root", "hdf5_dir"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a path string or null, got {getattr(self, name)!r}")
        if self.fold is not None and not (_is_int(self.fold) and 0 <= self.fold < self.num_folds):
            raise ValueError(f"fold must be None or in 0..{self.num_folds - 1} (--fold 0..{self.num_folds - 1} "
                             f"or all), got {self.fold!r}")
        if not (_is_number(self.learning_rate) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate!r}")
        if not (_is_number(self.lr_decay_factor) and 0 < self.lr_decay_factor <= 1):
            raise ValueError(f"lr_decay_factor must be in (0, 1], got {self.lr_decay_factor!r}")

    def _check_model(self) -> None:
        """ValueError unless `model` rebuilds the CRNN (unknown keys, bad values)."""
        # pylint: disable=import-outside-toplevel
        from asd_jax import checkpointing
        from asd_jax import model as model_lib
        if not isinstance(self.model, Mapping):
            raise ValueError(f"model must be a dict of CRNN fields, got {self.model!r}")
        try:
            model = model_lib.CRNN.from_config({**self.model, "dtype": self.compute_dtype})
        except (TypeError, ValueError) as e:
            raise ValueError(f"model {dict(self.model)} does not build the CRNN: {e}") from e
        checkpointing.check_num_cameras(model, "model")

    def replace(self, **changes) -> TrainConfig:
        """A copy with some fields changed (None values are ignored, so flags can pass through)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def learning_rate_for_epoch(self, epoch: int) -> float:
        """lr of 1-based `epoch` under this config's schedule."""
        return schedule.learning_rate_for_epoch(
            self.learning_rate, epoch, kind=self.lr_schedule,
            decay_start_epoch=self.lr_decay_start_epoch, decay_factor=self.lr_decay_factor)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; the keys of EXTRA_KEYS (e.g. `in_channels`) are ignored, any
        other key that is not a field is an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - set(EXTRA_KEYS))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}: expected TrainConfig fields "
                             f"{sorted(names)} (and {list(EXTRA_KEYS)})")
        kwargs = {k: v for k, v in values.items() if k in names}
        if isinstance(kwargs.get("model"), Mapping):
            kwargs["model"] = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs["model"].items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TrainConfig:
        """Reads a config.json written by `train_and_evaluate` (or by hand); a ValueError names
        the file."""
        values = read_config_json(path)
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config file {path}: {e}") from e


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of a config file, unchecked; an error names the file (missing, not UTF-8
    text, not JSON, not an object)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = json.loads(textfiles.read_text(path, "a training config (a JSON object)"))
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a JSON object")
    return values


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# lr0 of every released run (SPEC section 7: `released/<features>_<condition>/learning_rate.txt`
# in the reference's repository, where ASC(s) is spelt ASCs). Other pairs get the default, 1e-4.
RELEASED_LEARNING_RATES = {
    ("gcc_phat", "GT_GT"): 5e-4, ("gcc_phat", "GT_VAD"): 9e-5,
    ("gcc_phat", "ASC_GT"): 9e-5, ("gcc_phat", "ASC_VAD"): 1e-4,
    ("gcc_phat", "ASC(s)_GT"): 9e-5, ("gcc_phat", "ASC(s)_VAD"): 7e-5,
    ("gcc_phat", "TalkNet_GT"): 9e-5, ("gcc_phat", "TalkNet_VAD"): 1e-4,
    ("salsa_lite", "GT_GT"): 7e-5,
}


def paper(features: str = "gcc_phat", condition: str = "GT_GT") -> TrainConfig:
    """The paper's recipe (Adam, 50 epochs of batch 32, seed 42) for `features` under
    `condition`, at the learning rate of the released run of that pair
    (`RELEASED_LEARNING_RATES`), or the default 1e-4 where none was released."""
    return TrainConfig(features=features, condition=condition,
                       learning_rate=RELEASED_LEARNING_RATES.get(
                           (features, condition), TrainConfig.learning_rate))


def paper_gcc() -> TrainConfig:
    """The released gcc GT_GT run: GCC-PHAT features, lr 5e-4, 50 epochs of batch 32."""
    return paper("gcc_phat", "GT_GT")


def paper_salsa() -> TrainConfig:
    """The released salsa-lite GT_GT run: SALSA-Lite features, lr 7e-5."""
    return paper("salsa_lite", "GT_GT")


def tiny() -> TrainConfig:
    """A CPU-sized model with the paper's structure (4 conv blocks, GRU, two linear layers),
    for tests and the demo on synthetic data; features are cached in memory."""
    return TrainConfig(features="gcc_phat", condition="GT_GT", model=dict(TINY_MODEL),
                       learning_rate=3e-3, lr_schedule="constant", batch_size=8, num_epochs=20,
                       cache_features=True)


PRESETS = {"paper_gcc": paper_gcc, "paper_salsa": paper_salsa, "tiny": tiny}


def starting_config(workdir: str | os.PathLike, config_json: str | os.PathLike | None,
                    preset: str | None, features: str | None = None, condition: str | None = None,
                    fold: str | None = None) -> tuple[TrainConfig, str | None]:
    """What `experiments.train` starts from: (the config its flags then change, the fold).

    The config is `config_json`'s; without it and without a `preset`, the workdir's own
    config.json when there is one (resuming its run); else the preset (`get_config`, paper_gcc
    by default). A `preset` and a `config_json` together are refused (ValueError): the file
    would replace every setting of the preset. A config of a cross-validation run
    (`"cross_validation": true`) means fold "all" unless `fold` is given, whichever way it was
    named.
    """
    if config_json is not None and preset is not None:
        raise ValueError(f"both a preset ({preset!r}) and a config file ({config_json}) were given; "
                         "the file sets every setting, so give one of them (--config or --config_json)")
    resumable = pathlib.Path(workdir) / constants.CONFIG_FILE
    if config_json is None and preset is None and resumable.is_file():
        config_json = resumable
    if config_json is None:
        return get_config(preset or "paper_gcc", features, condition), fold
    if fold is None and read_config_json(config_json).get("cross_validation"):
        fold = "all"
    return TrainConfig.from_json(config_json), fold


def get_config(name: str, features: str | None = None, condition: str | None = None) -> TrainConfig:
    """The preset called `name` (one of PRESETS), with other `features` or `condition` if given.

    A paper preset with other features or another condition is the paper's recipe for that
    pair, learning rate included: `get_config("paper_gcc", condition="TalkNet_GT")` trains at
    9e-5 as the released gcc TalkNet_GT run did, not at paper_gcc's 5e-4.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}: expected one of {sorted(PRESETS)}")
    config = PRESETS[name]()
    if name in ("paper_gcc", "paper_salsa"):
        return paper(features or config.features, condition or config.condition)
    return config.replace(features=features, condition=condition)
