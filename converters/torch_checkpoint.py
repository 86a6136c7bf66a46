"""Reads a PyTorch checkpoint (the zip format of `torch.save`) into numpy arrays, safely.

No torch import and no code from the file is ever run: the pickle inside the zip may only name
the globals in `ALLOWED_GLOBALS` (an ordered dict, the tensor/parameter rebuild functions and the
typed storage classes), each of which is replaced here by a small numpy implementation. Any other
global (`os.system`, `builtins.eval`, ...) is refused by name before it is resolved.

File layout read here: `<archive>/data.pkl` (the pickled object), `<archive>/data/<key>` (raw
storage bytes, one record per storage), `<archive>/byteorder` ("little" or "big"; absent in old
files = little).
"""

from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import hashlib
import io
import os
import pathlib
import pickle
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (legacy, truncated, corrupt, empty, wrong content)."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint's pickle names a global outside the allow-list."""


# Typed storage class name (as pickled by torch.save) -> numpy dtype.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

ALLOWED_GLOBALS = frozenset(
    {("collections", "OrderedDict"),
     ("torch._utils", "_rebuild_tensor_v2"),
     ("torch._utils", "_rebuild_parameter")}
    | {("torch", name) for name in STORAGE_DTYPES})

# Wrapper keys under which training scripts commonly nest the state_dict.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclasses.dataclass(frozen=True)
class _Storage:
    """One storage record as a flat numpy array of its dtype."""

    data: np.ndarray


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None) -> np.ndarray:
    """numpy version of torch._utils._rebuild_tensor_v2: a strided view, copied out."""
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"tensor rebuild got {type(storage).__name__}, expected a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    offset = int(storage_offset)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"tensor with size {size} and stride {stride} is malformed")
    flat = storage.data
    if 0 in size:
        return np.zeros(size, flat.dtype)
    if int(np.prod(size)) > flat.size:  # e.g. stride 0: would let a small file allocate a lot
        raise CheckpointError(f"tensor of size {size} (stride {stride}) has more elements than its "
                              f"storage ({flat.size}); expanded tensors are not supported")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= flat.size:
        raise CheckpointError(
            f"tensor (offset {offset}, size {size}, stride {stride}) reaches element {last} of a "
            f"storage of {flat.size} elements: the file is corrupt")
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * flat.itemsize for s in stride),
        writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> np.ndarray:
    """numpy version of torch._utils._rebuild_parameter: the tensor itself."""
    return data


_SAFE_OBJECTS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals (to numpy stand-ins); storages come from the zip."""

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
        super().__init__(file)
        self._zf, self._prefix, self._byteorder, self._path = zf, prefix, byteorder, path
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        # Protocol 2 pickles (torch.save's) use Python 2 names for some modules
        # (builtins -> __builtin__, subprocess -> commands); name what the pickle would run.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            py3_module, py3_name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            py3_module, py3_name = _compat_pickle.IMPORT_MAPPING.get(module, module), name
        if (py3_module, py3_name) not in ALLOWED_GLOBALS:
            pickled_as = "" if (module, name) == (py3_module, py3_name) else f" (pickled as {module}.{name})"
            raise UnsafeCheckpointError(
                f"{self._path}: the checkpoint's pickle refers to {py3_module}.{py3_name}{pickled_as}, "
                f"which is not allowed (only {sorted('.'.join(g) for g in ALLOWED_GLOBALS)}); "
                "refusing to load it")
        return _SAFE_OBJECTS[(py3_module, py3_name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self._path}: unexpected persistent id {pid!r} in the pickle")
        _, storage_type, key, _location, numel = pid  # location ('cpu', 'cuda:0') is ignored
        key = str(key)
        if key not in self._storages:
            record = f"{self._prefix}data/{key}"
            try:
                raw = self._zf.read(record)
            except KeyError:
                raise CheckpointError(f"{self._path}: storage record {record} is missing") from None
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            if len(raw) != int(numel) * dtype.itemsize:
                raise CheckpointError(
                    f"{self._path}: storage record {record} has {len(raw)} bytes, expected "
                    f"{int(numel)} x {dtype.itemsize} ({storage_type.name}): the file is corrupt")
            data = np.frombuffer(raw, dtype=dtype).astype(storage_type.dtype)  # native order
            self._storages[key] = _Storage(data)
        return self._storages[key]


def git_blob_id(path: str | os.PathLike) -> str:
    """The file's git blob id (what `git hash-object PATH` prints)."""
    data = pathlib.Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Unpickles a `torch.save` zip file safely; tensors become numpy arrays.

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: an empty, legacy (non-zip), truncated or corrupt file.
      UnsafeCheckpointError: the pickle names a global outside `ALLOWED_GLOBALS`.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is a directory; expected a PyTorch checkpoint "
                                "file (torch.save's zip, e.g. model_050.ckpt)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK"):
            raise CheckpointError(f"checkpoint {path} ({size} bytes) starts like a zip file but has "
                                  "no zip directory: it is truncated or corrupt")
        if head[:1] == b"\x80":
            raise CheckpointError(
                f"checkpoint {path} is in PyTorch's legacy (non-zip) format, which is not read "
                "here; re-save it with torch >= 1.6: torch.save(torch.load(path, weights_only=True), "
                "new_path)")
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: expected the zip format "
                              f"written by torch.save, found leading bytes {head!r}")
    try:
        with zipfile.ZipFile(path) as zf:
            pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError(f"checkpoint {path}: expected one <archive>/data.pkl record, "
                                      f"found {pickles or 'none'}")
            prefix = pickles[0][: -len("data.pkl")]
            byteorder = "little"
            if f"{prefix}byteorder" in zf.namelist():
                byteorder = zf.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
                if byteorder not in ("little", "big"):
                    raise CheckpointError(f"checkpoint {path}: byteorder record {byteorder!r}, "
                                          "expected 'little' or 'big'")
            payload = zf.read(pickles[0])
            unpickler = _SafeUnpickler(io.BytesIO(payload), zf, prefix, byteorder, str(path))
            return unpickler.load()
    except CheckpointError as e:
        if str(path) in str(e):
            raise
        raise type(e)(f"checkpoint {path}: {e}") from e  # errors raised while rebuilding tensors
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, zlib.error, OSError,
            ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: "
                              f"{type(e).__name__}: {e}") from e


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """The state_dict inside a loaded checkpoint: bare, or under one of `WRAPPER_KEYS`.

    A "module." prefix on every key (DataParallel) is removed.
    """
    if not _is_state_dict(obj) and isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if key in obj and _is_state_dict(obj[key]):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        keys = sorted(map(str, obj)) if isinstance(obj, dict) else None
        raise CheckpointError(
            f"{source} holds no state_dict: expected a dict of tensors, or one under a key in "
            f"{list(WRAPPER_KEYS)}; found {type(obj).__name__}" + (f" with keys {keys}" if keys else ""))
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The PyTorch state_dict saved in `path`, as numpy arrays (dtypes kept, native order)."""
    return extract_state_dict(load_checkpoint(path), source=f"checkpoint {path}")
