"""The precache: a zarr v3 store of feature examples, one group per entry.

Layout (plain zarr v3, readable by any zarr or xarray client)::

    STORE/zarr.json                  root group; attrs["megafold"]: schema version
    STORE/<key>/zarr.json            entry group; attrs["megafold"]: versions, inputs
                                     (source hash, MSA files, sequence db), per-array
                                     sha256 checksums, metadata; consolidated metadata
    STORE/<key>/<feature>/...        one array per FEATURES entry, blosc-lz4 compressed,
                                     chunked along its first axis, dimension_names set

Arrays hold the features in compact storage dtypes (e.g. uint8 residue types); ``load``
returns the schema dtypes of ``features.FEATURES``. One exception to one-array-per-
feature: the sparse ``[N, N]`` token_bonds matrix is stored as its bonded pairs,
``token_bond_pairs`` ``[K, 2]`` (i < j); read as a dense matrix it would dominate the
load time of a large entry. Entries are written into a hidden
``.tmp-*`` group and renamed into place, so a reader never sees half an entry. Only
arrays and JSON attributes are stored: nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from megafold.data.features import FEATURES
from megafold.errors import CacheError

SCHEMA_VERSION = 1
# Bump when featurization changes in a way that makes old entries stale.
PIPELINE_VERSION = "1.0"
ATTRS_KEY = "megafold"
CHUNK_BYTES = 4 << 20
BOND_PAIRS = "token_bond_pairs"
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")
# Values fit: residue/element/char indices < 256, indices < 2**31; has_deletion is 0/1.
STORAGE_DTYPES = {
    "restype": np.uint8,
    "msa": np.uint8,
    "template_restype": np.uint8,
    "ref_element": np.uint8,
    "ref_atom_name_chars": np.uint8,
    "has_deletion": np.bool_,
}


def storage_dtype(name: str) -> np.dtype:
    spec = FEATURES[name]
    if name in STORAGE_DTYPES:
        return np.dtype(STORAGE_DTYPES[name])
    return np.dtype(np.int32) if spec.dtype == np.int64 else spec.dtype


def stored_arrays(example: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
    """The arrays an entry stores for ``example``: name -> (array in storage dtype, dims)."""
    out = {}
    for name, spec in FEATURES.items():
        if name == "token_bonds":
            pairs = np.argwhere(np.triu(np.asarray(example[name], bool), k=1)).astype(np.int32)
            out[BOND_PAIRS] = (pairs.reshape(-1, 2), ("bond", "pair"))
        else:
            value = np.asarray(example[name])
            stored = np.ascontiguousarray(value.astype(storage_dtype(name)))
            if stored.dtype != value.dtype and not np.array_equal(stored, value):
                raise CacheError(f"feature {name}: values do not fit its storage dtype {stored.dtype}")
            out[name] = (stored, spec.dims)
    return out


def array_checksum(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def check_key(key: str) -> str:
    if not _KEY_PATTERN.fullmatch(key) or key.startswith("."):
        raise CacheError(f"invalid entry key {key!r}: use letters, digits, '_', '-', '.'")
    return key


class Store:
    """A precache store opened for reading (``open_store``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = _read_json(self.path / "zarr.json", self.path)
        info = meta.get("attributes", {}).get(ATTRS_KEY)
        if not isinstance(info, dict) or "schema_version" not in info:
            raise CacheError(f"{self.path}: not a megafold precache store (no megafold attributes)")
        if info["schema_version"] != SCHEMA_VERSION:
            raise CacheError(
                f"{self.path}: store schema version {info['schema_version']}, this megafold reads "
                f"{SCHEMA_VERSION}; rebuild it with `megafold precache`"
            )
        self.info = info

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, {len(self.keys())} entries)"

    def keys(self) -> list[str]:
        """Entry keys, sorted (hidden temporary groups of a running build are not entries)."""
        return sorted(
            p.name for p in self.path.iterdir() if not p.name.startswith(".") and (p / "zarr.json").is_file()
        )

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key: str) -> bool:
        return bool(_KEY_PATTERN.fullmatch(key)) and (self.path / key / "zarr.json").is_file()

    def attrs(self, key: str) -> dict[str, Any]:
        """The entry's megafold attributes: versions, inputs, checksums, metadata."""
        return self._entry_meta(key)["attributes"][ATTRS_KEY]

    def load(self, key: str) -> dict[str, np.ndarray]:
        """Every feature of entry ``key`` as numpy arrays in the FEATURES dtypes."""
        meta = self._entry_meta(key)
        arrays = meta["consolidated_metadata"]["metadata"]
        entry = os.path.join(self.path, key)  # plain strings: pathlib costs ~1 ms per entry here
        out = {}
        for name, spec in FEATURES.items():
            stored = BOND_PAIRS if name == "token_bonds" else name
            if stored not in arrays:
                raise CacheError(f"{self.path / key}: array {stored!r} is missing; rebuild the entry")
            value = _read_array(os.path.join(entry, stored), arrays[stored])
            if name == "token_bonds":
                n_tokens = len(out["restype"])
                if value.size and value.max() >= n_tokens:
                    raise CacheError(f"{entry}: token_bond_pairs point past the tokens; run verify() and rebuild")
                value, pairs = np.zeros((n_tokens, n_tokens), bool), value
                value[pairs[:, 0], pairs[:, 1]] = value[pairs[:, 1], pairs[:, 0]] = True
            out[name] = value.astype(spec.dtype, copy=False)
        return out

    def dataset(self, key: str):
        """Entry ``key`` as an ``xarray.Dataset`` with the named dimensions of FEATURES."""
        import xarray as xr

        example = self.load(key)
        attrs = self.attrs(key)
        metadata = attrs.get("metadata", {})
        return xr.Dataset(
            {name: (FEATURES[name].dims, value) for name, value in example.items()},
            attrs={
                "key": key,
                "pdb_id": metadata.get("pdb_id", ""),
                "source": attrs["inputs"].get("source", ""),
                "source_sha256": attrs["inputs"].get("source_sha256", ""),
                "pipeline_version": attrs["pipeline_version"],
                "schema_version": attrs["schema_version"],
                "metadata": json.dumps(metadata),
            },
        )

    def verify(self, keys: list[str] | None = None) -> list[str]:
        """Keys of entries whose data no longer matches their checksums (or cannot be read)."""
        return [key for key in (self.keys() if keys is None else keys) if verify_entry(self.path / key)]

    def _entry_meta(self, key: str) -> dict:
        if key not in self:
            raise CacheError(f"{self.path}: no entry {key!r}")
        meta = _read_json(self.path / key / "zarr.json", self.path / key)
        if ATTRS_KEY not in meta.get("attributes", {}) or "consolidated_metadata" not in meta:
            raise CacheError(f"{self.path / key}: entry metadata is incomplete; rebuild the entry")
        return meta


def open_store(path: str | Path) -> Store:
    """Open a precache store for reading; CacheError names the path if it is missing or not one."""
    path = Path(path)
    if not path.is_dir():
        raise CacheError(f"{path}: no precache store here (run `megafold precache SRC... --out {path}`)")
    return Store(path)


def create_store(path: str | Path) -> Path:
    """Create an empty store at ``path`` (or check that the existing one is compatible)."""
    import zarr

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CacheError(f"{path}: exists and is not a directory")
    if (path / "zarr.json").is_file():
        Store(path)  # raises CacheError on a foreign or incompatible store
        return path
    if path.is_dir() and any(not p.name.startswith(".") for p in path.iterdir()):
        raise CacheError(f"{path}: directory is not empty and not a precache store")
    group = zarr.open_group(str(path), mode="a", zarr_format=3)  # "w" would replace the directory
    group.attrs[ATTRS_KEY] = {"schema_version": SCHEMA_VERSION, "format": "megafold precache"}
    return path


def write_entry(root: str | Path, key: str, example: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> None:
    """Write one entry atomically: a hidden temporary group, renamed into place when complete."""
    import zarr
    from zarr.codecs import BloscCodec

    root = Path(root)
    check_key(key)
    tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    checksums = {}
    for name, (value, dims) in stored_arrays(example).items():
        row_bytes = max(value[:1].nbytes, 1)
        group.create_array(
            name,
            data=value,
            chunks=(max(1, min(value.shape[0], CHUNK_BYTES // row_bytes)), *(max(s, 1) for s in value.shape[1:])),
            # lz4 decompresses ~3x faster than zstd; the loader reads every array per sample
            compressors=BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
            dimension_names=dims,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        checksums[name] = array_checksum(value)
    group.attrs[ATTRS_KEY] = {
        "schema_version": SCHEMA_VERSION,
        "pipeline_version": PIPELINE_VERSION,
        **dict(attrs),
        "checksums": checksums,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not in the v3 spec (yet)"
        zarr.consolidate_metadata(str(tmp))
    final = root / key
    if final.exists():
        old = root / f".old-{key}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def verify_entry(path: str | Path) -> str | None:
    """None if the entry at ``path`` reads back and matches its checksums, else the reason."""
    import zarr

    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r", use_consolidated=False)
        info = dict(group.attrs)[ATTRS_KEY]
        checksums = info["checksums"]
        for name in (BOND_PAIRS if n == "token_bonds" else n for n in FEATURES):
            if name not in checksums:
                return f"array {name} has no checksum"
            if array_checksum(np.asarray(group[name][...])) != checksums[name]:
                return f"array {name} does not match its checksum"
    except Exception as exc:  # any unreadable piece means the entry is bad
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def _read_json(path: Path, owner: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{owner}: not a precache store or entry (no {path.name})") from None
    except (OSError, ValueError) as exc:
        raise CacheError(f"{owner}: corrupt metadata {path.name} ({exc})") from exc


def _read_array(path: str, meta: Mapping[str, Any]) -> np.ndarray:
    """Read one array of an entry.

    zarr-python spends ~0.4 ms of asyncio overhead per array; an entry has ~36, which
    alone would exceed the 5 ms budget of a load. Arrays this module writes (bytes +
    blosc, chunked along axis 0) are decoded here with numcodecs directly; anything
    else goes through zarr.
    """
    shape = tuple(meta["shape"])
    dtype = np.dtype(_NUMPY_DTYPES.get(meta["data_type"], "V"))
    codecs = meta.get("codecs", [])
    chunk_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    simple = (
        dtype.kind != "V"
        and [c["name"] for c in codecs] == ["bytes", "blosc"]
        and codecs[0].get("configuration", {}).get("endian", "little") == "little"
        and meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/") == "/"
        and meta.get("chunk_key_encoding", {}).get("name") == "default"
        and all(c >= s for c, s in zip(chunk_shape[1:], shape[1:]))
    )
    try:
        if not simple:
            import zarr

            return np.asarray(zarr.open_array(path, mode="r")[...])
        out = np.empty(shape, dtype)
        if out.size == 0:
            return out
        rows = chunk_shape[0]
        inner = "".join("/0" for _ in shape[1:])
        for c, start in enumerate(range(0, shape[0], rows)):
            with open(f"{path}/c/{c}{inner}", "rb") as chunk_file:
                raw = _blosc().decode(chunk_file.read())
            chunk = np.frombuffer(raw, dtype).reshape(chunk_shape)
            stop = min(start + rows, shape[0])
            out[start:stop] = chunk[(slice(0, stop - start), *(slice(0, s) for s in shape[1:]))]
        return out
    except Exception as exc:
        raise CacheError(f"{path}: cannot read array ({type(exc).__name__}: {exc}); run verify() and rebuild") from exc


@lru_cache(maxsize=1)
def _blosc():
    from numcodecs import Blosc

    return Blosc()


_NUMPY_DTYPES = {
    "bool": "|b1",
    "uint8": "|u1",
    "int8": "|i1",
    "int16": "<i2",
    "int32": "<i4",
    "int64": "<i8",
    "uint16": "<u2",
    "uint32": "<u4",
    "float16": "<f2",
    "float32": "<f4",
    "float64": "<f8",
}
