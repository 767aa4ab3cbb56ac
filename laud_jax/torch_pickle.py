"""Read PyTorch checkpoint files (.pth, .pth.tar) without torch and without running pickled code.

Both of torch's formats are read: the zip format (``torch.save`` since 1.6: ``*/data.pkl``
plus one record per storage) and the legacy format (a sequence of pickles followed by the
raw storages, as in torchvision's classic ResNet files). The unpickler resolves only an
allow-list of names: tensor and storage rebuilds, plain containers (dict, OrderedDict, list,
tuple, set), numpy scalars/arrays and ``argparse.Namespace``. Anything else (``os.system``,
a pickled ``nn.Module``, ...) is refused with :class:`UnsafeCheckpointError` before it is
called. Tensors come back as numpy arrays.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

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
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}

TORCH_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}


class CheckpointFormatError(ValueError):
    """The file is not a readable PyTorch checkpoint (truncated, wrong format, bad tensor)."""


class UnsafeCheckpointError(CheckpointFormatError):
    """The pickle asks for a global outside the allow-list (it could run arbitrary code)."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclasses.dataclass(frozen=True)
class _TensorType:
    """Marker for torch.Tensor / nn.Parameter when they appear as pickled classes."""

    name: str


@dataclasses.dataclass
class _Storage:
    """A typed storage: ``numel`` elements of ``dtype``; ``data`` is filled when read."""

    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None
    base: _Storage | None = None  # legacy views: (root storage, element offset)
    offset: int = 0

    def array(self) -> np.ndarray:
        if self.base is not None:
            return self.base.array()[self.offset : self.offset + self.numel]
        if self.data is None:
            raise CheckpointFormatError("a tensor refers to a storage whose data is missing from the file")
        return self.data


@dataclasses.dataclass
class _LazyTensor:
    """A tensor to materialize once every storage has been read (legacy files store data last)."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialize(self) -> np.ndarray:
        data = self.storage.array()
        size, stride = self.size, self.stride
        if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
            raise CheckpointFormatError(f"tensor with invalid size {size} / stride {stride}")
        if self.offset < 0:
            raise CheckpointFormatError(f"tensor with negative storage offset {self.offset}")
        if math.prod(size) == 0:
            return np.zeros(size, data.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= data.size:
            raise CheckpointFormatError(
                f"tensor of size {size}, stride {stride}, offset {self.offset} reaches element "
                f"{last} of a storage with {data.size} elements: the file is corrupt"
            )
        item = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], shape=size, strides=[s * item for s in stride], writeable=False
        )
        return np.array(view, copy=True)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
        raise CheckpointFormatError(f"tensor {what} must be a tuple of ints, got {value!r}")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _LazyTensor:
    if not isinstance(storage, _Storage):
        raise CheckpointFormatError(f"tensor rebuild got {type(storage).__name__} instead of a storage")
    if not isinstance(storage_offset, int):
        raise CheckpointFormatError(f"tensor storage offset must be an int, got {storage_offset!r}")
    return _LazyTensor(storage, storage_offset, _int_tuple(size, "size"), _int_tuple(stride, "stride"))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    if not isinstance(data, _LazyTensor):
        raise CheckpointFormatError("a parameter rebuild got something that is not a tensor")
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    del state
    if func not in (_rebuild_tensor, _rebuild_parameter) or not isinstance(new_type, _TensorType):
        raise UnsafeCheckpointError("refusing a tensor-subclass rebuild that is not Tensor/Parameter")
    return func(*args)


def _torch_size(values: Any = ()) -> tuple[int, ...]:
    return _int_tuple(tuple(values), "Size")


def _torch_device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


def _numpy_dtype(name: Any, align: bool = False, copy: bool = False) -> np.dtype:
    del align, copy
    dtype = np.dtype(name) if isinstance(name, str) else None
    if dtype is None or dtype.kind not in "biufc":
        raise UnsafeCheckpointError(f"refusing numpy dtype {name!r} (only numeric dtypes are read)")
    return dtype


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, bytes):
        raise UnsafeCheckpointError("refusing a numpy scalar that is not a plain number")
    return np.frombuffer(data, dtype, count=1)[0]


def _numpy_reconstruct(cls: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    if cls is not np.ndarray:
        raise UnsafeCheckpointError("refusing a numpy reconstruction of something other than ndarray")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """How protocol-2 pickles spell a bytes literal: ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8"):
        raise UnsafeCheckpointError("refusing a _codecs.encode call that is not a bytes literal")
    return text.encode(encoding)


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if cls is argparse.Namespace and base is object and state is None:
        return argparse.Namespace()
    raise UnsafeCheckpointError(f"refusing copyreg reconstruction of {cls!r}")


def _safe_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "slice"): slice,
        ("__builtin__", "set"): set,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
        ("torch", "Tensor"): _TensorType("Tensor"),
        ("torch._tensor", "Tensor"): _TensorType("Tensor"),
        ("torch.nn.parameter", "Parameter"): _TensorType("Parameter"),
        ("torch", "Size"): _torch_size,
        ("torch", "device"): _torch_device,
        ("argparse", "Namespace"): argparse.Namespace,
        ("copyreg", "_reconstructor"): _copyreg_reconstructor,
        ("_codecs", "encode"): _codecs_encode,
        ("numpy", "dtype"): _numpy_dtype,
        ("numpy", "ndarray"): np.ndarray,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "scalar")] = _numpy_scalar
        allowed[(module, "_reconstruct")] = _numpy_reconstruct
    for name in STORAGE_DTYPES:
        allowed[("torch", name)] = _StorageType(name)
        allowed[("torch.storage", name)] = _StorageType(name)
    for name, dtype in TORCH_DTYPES.items():
        allowed[("torch", name)] = dtype
    return allowed


SAFE_GLOBALS = _safe_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`SAFE_GLOBALS`; storages come from ``load_storage``."""

    def __init__(self, file: io.BufferedIOBase, source: str, load_storage):
        super().__init__(file, encoding="latin1")
        self._source = source
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            pass
        hint = (
            " The file holds a pickled model object, not a state_dict: load it with torch where "
            "you trust it and re-save `model.state_dict()`."
            if module.startswith("torch.nn") or module.startswith("torchvision")
            else " A PyTorch state_dict never needs it; the file may be malicious."
        )
        raise UnsafeCheckpointError(
            f"refusing to load {self._source}: its pickle asks for '{module}.{name}', which is "
            f"not a tensor, storage or plain container.{hint}"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise CheckpointFormatError(f"{self._source}: unexpected persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage":
            raise UnsafeCheckpointError(
                f"refusing to load {self._source}: it embeds a {kind!r} record (pickled module "
                "source), not only tensors. Re-save `model.state_dict()` with torch."
            )
        return self._load_storage(pid[1:])


def _storage_type(value: Any, source: str) -> _StorageType:
    if not isinstance(value, _StorageType):
        raise CheckpointFormatError(f"{source}: storage record with unknown type {value!r}")
    return value


def _materialize(obj: Any) -> Any:
    """Replace every lazy tensor in a tree of containers by its numpy array."""
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for key, value in obj.items():
            out[key] = _materialize(value)
        return out
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v) for v in obj)
    if isinstance(obj, argparse.Namespace):
        return argparse.Namespace(**{k: _materialize(v) for k, v in vars(obj).items()})
    return obj


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointFormatError(
                f"{path} is a zip file but not a PyTorch checkpoint (expected one '<name>/data.pkl', "
                f"found {pickles or 'none'})"
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode("ascii").strip()
        storages: dict[str, _Storage] = {}

        def load_storage(record: tuple) -> _Storage:
            if len(record) != 4:
                raise CheckpointFormatError(f"{path}: storage record {record!r} is malformed")
            storage_type, key, _location, numel = record
            storage_type = _storage_type(storage_type, path)
            key = str(key)
            if key not in storages:
                entry = f"{prefix}data/{key}"
                if entry not in names:
                    raise CheckpointFormatError(f"{path}: storage {key} is missing ({entry})")
                raw = archive.read(entry)
                dtype = storage_type.dtype.newbyteorder("<" if byteorder == "little" else ">")
                if len(raw) % dtype.itemsize:
                    raise CheckpointFormatError(f"{path}: storage {key} has a truncated element")
                data = np.frombuffer(raw, dtype).astype(storage_type.dtype, copy=False)
                if storage_type.name != "UntypedStorage" and isinstance(numel, int) and data.size < numel:
                    raise CheckpointFormatError(
                        f"{path}: storage {key} holds {data.size} elements, the pickle expects {numel}"
                    )
                storages[key] = _Storage(storage_type.dtype, data.size, data)
            return storages[key]

        with archive.open(pickles[0]) as f:
            obj = _RestrictedUnpickler(io.BytesIO(f.read()), path, load_storage).load()
    return _materialize(obj)


def _load_legacy(path: str, raw: bytes) -> Any:
    f = io.BytesIO(raw)

    def no_storage(record: tuple) -> Any:
        raise CheckpointFormatError(f"{path}: storage record in the header of a legacy checkpoint")

    def header() -> Any:
        return _RestrictedUnpickler(f, path, no_storage).load()

    try:
        magic = header()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        if isinstance(e, CheckpointFormatError):
            raise
        raise CheckpointFormatError(f"{path} is neither a zip-format nor a legacy PyTorch checkpoint ({e})") from e
    if magic != LEGACY_MAGIC:
        raise CheckpointFormatError(f"{path} is not a PyTorch checkpoint (no zip archive, no legacy magic number)")
    protocol = header()
    if protocol != LEGACY_PROTOCOL:
        raise CheckpointFormatError(f"{path}: unsupported legacy protocol version {protocol!r}")
    sys_info = header()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise CheckpointFormatError(f"{path} was written on a big-endian machine; re-save it with torch")

    roots: dict[str, _Storage] = {}

    def load_storage(record: tuple) -> _Storage:
        if len(record) != 5:
            raise CheckpointFormatError(f"{path}: legacy storage record {record!r} is malformed")
        storage_type, key, _location, numel, view = record
        storage_type = _storage_type(storage_type, path)
        key = str(key)
        if key not in roots:
            roots[key] = _Storage(storage_type.dtype, int(numel))
        root = roots[key]
        if view is None:
            return root
        _view_key, offset, size = view
        return _Storage(root.dtype, int(size), base=root, offset=int(offset))

    obj = _RestrictedUnpickler(f, path, load_storage).load()
    keys = _RestrictedUnpickler(f, path, no_storage).load()
    for key in keys:
        key = str(key)
        if key not in roots:
            raise CheckpointFormatError(f"{path}: storage {key} is stored but never used")
        storage = roots[key]
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointFormatError(f"{path} is truncated (storage {key} missing)")
        (numel,) = struct.unpack("<q", head)
        if numel != storage.numel:
            raise CheckpointFormatError(f"{path}: storage {key} has {numel} elements, expected {storage.numel}")
        nbytes = numel * storage.dtype.itemsize
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise CheckpointFormatError(f"{path} is truncated inside storage {key}")
        storage.data = np.frombuffer(data, storage.dtype.newbyteorder("<")).astype(storage.dtype, copy=False)
    return _materialize(obj)


def load(path: str | os.PathLike) -> Any:
    """Contents of a PyTorch checkpoint file, with tensors as numpy arrays.

    Raises :class:`UnsafeCheckpointError` if the file asks for any code outside the
    allow-list, :class:`CheckpointFormatError` if it is not a readable checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b" or raw[257:262] == b"ustar":
        raise CheckpointFormatError(
            f"{path} is a gzip/tar archive: the pre-0.4 PyTorch tar format is not supported; "
            "re-save it with a recent torch"
        )
    return _load_legacy(path, raw)
