"""A per-block cache of dequantised weights: a device installs a block by reading one file.

Building a block from a checkpoint reads and dequantises its slices (for a Q4_1 GGUF, an
FFN block's three matrices), which costs tens of milliseconds of CPU at full speed and
far more on a small device's CPU share. The cache keeps every movable block's
``weight_tensors()`` (float32, exactly the tensors the block holds) in a safetensors file
of its own, so a later load of the same block is a file read:

    <cache_dir>/weights/<checkpoint sha256[:16]>/<block>.safetensors

Entries are written atomically (a temporary file renamed into place), so agents that
build the same block at once never see half a file. The directory is named by the
checksum of the checkpoint's bytes: a changed model file starts a new directory and the
old entries are never read. The checksum of a file is computed once per (path, size,
mtime) and remembered in ``<cache_dir>/weights/checksums.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["WeightCache", "checkpoint_checksum"]

_HASH_CHUNK_BYTES = 1 << 22  # 4 MiB per read while hashing a checkpoint
_DIGEST_CHARS = 16  # 64 bits of the sha256 name a cache directory


def _files_of(path: Path) -> list[Path]:
    """The files whose bytes make a checkpoint: a .gguf file, or a directory's weights and
    configuration (safetensors and JSON)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))


def _stamp(files: list[Path]) -> str:
    """What must be unchanged for a remembered checksum to hold: names, sizes, mtimes."""
    parts = []
    for f in files:
        st = f.stat()
        parts.append(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def checkpoint_checksum(path: str | Path, cache_dir: Path) -> str:
    """sha256 (hex) of a checkpoint's bytes, remembered under cache_dir by path, size and
    mtime so that each agent start does not read the whole file again."""
    files = _files_of(Path(path))
    stamp = _stamp(files)
    memo = cache_dir / "checksums.json"
    known: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(memo.read_text())
    if isinstance(known, dict) and isinstance(known.get(stamp), str):
        return known[stamp]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as stream:
            while chunk := stream.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    value = digest.hexdigest()
    known = known if isinstance(known, dict) else {}
    known[stamp] = value
    with contextlib.suppress(OSError):
        _write_atomically(memo, json.dumps(known, indent=1).encode())
    return value


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class WeightCache:
    """Dequantised weights of one checkpoint's movable blocks, one file per block."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @classmethod
    def for_checkpoint(cls, checkpoint: str | Path, cache_dir: str | Path) -> WeightCache:
        """The cache of a checkpoint (a .gguf file or a Hugging Face directory) under
        ``cache_dir`` (e.g. ``edgepart.llm.host_profile.default_cache_dir()``)."""
        root = Path(cache_dir) / "weights"
        checksum = checkpoint_checksum(checkpoint, root)
        return cls(root / checksum[:_DIGEST_CHARS])

    def path(self, block: str) -> Path:
        """The file of a block's weights (whether or not it exists yet)."""
        return self.directory / f"{block}.safetensors"

    def get(self, block: str) -> dict[str, torch.Tensor] | None:
        """The block's weight tensors, or None when not cached (or the entry is unreadable:
        it is then rebuilt from the checkpoint and written again)."""
        path = self.path(block)
        if not path.is_file():
            return None
        try:
            return load_file(path)
        except (OSError, ValueError, RuntimeError):
            return None
        except Exception as exc:  # safetensors raises its own error type on a damaged file
            if type(exc).__name__ == "SafetensorError":
                return None
            raise

    def put(self, block: str, weights: dict[str, torch.Tensor]) -> None:
        """Keep a block's weights (contiguous copies); a failed write leaves no entry."""
        path = self.path(block)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        try:
            # clones: safetensors refuses tensors that share storage (views of one matrix)
            save_file({k: v.detach().clone().contiguous() for k, v in weights.items()}, tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def __contains__(self, block: str) -> bool:
        return self.path(block).is_file()
