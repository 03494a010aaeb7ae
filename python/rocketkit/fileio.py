"""Atomic file output and validated input. Every file rocketkit writes goes through here,
so an interrupted run leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create 0600/0700 entries; results get the permissions a plain open() would give.
_FILE_MODE = 0o666 & ~_current_umask()
_DIR_MODE = 0o777 & ~_current_umask()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A temporary file next to ``path`` (same folder, so the rename is atomic), moved onto
    ``path`` with its data fsynced when the block ends, deleted if it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, _FILE_MODE)
        finally:
            os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, then rename."""
    with _temporary_beside(Path(path)) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object; a missing, truncated or corrupted file is a ValueError naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (truncated or corrupted?): {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors.torch.save_file into a temporary file in the same folder, fsync, then rename.
    The tensors are written straight to the file (no in-memory copy of the whole file)."""
    from safetensors.torch import save_file

    with _temporary_beside(Path(path)) as tmp:
        save_file(tensors, tmp, metadata=metadata)
        if metadata is not None and len(metadata) > 1:
            with open(tmp, "rb+") as f:
                _sort_safetensors_metadata(f)


def _sort_safetensors_metadata(f) -> None:
    """Rewrite a safetensors header in place with its ``__metadata__`` keys sorted. safetensors
    builds the metadata in a Rust HashMap, whose order changes from process to process, so the same
    tensors and metadata would otherwise give different bytes. The header keeps its length."""
    import struct

    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    raw = f.read(n)
    header = json.loads(raw)
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:
        raise RuntimeError("safetensors header grew while sorting its metadata")
    f.seek(8)
    f.write(text + b" " * (n - len(text)))


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders (``.NAME.*.tmp``) that writers killed before their
    rename left in ``folder`` (not recursive); returns what was removed. Only call it while no
    writer is active in the folder."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    return removed


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict, dict]:
    """Load tensors and metadata; a truncated or corrupted file is a ValueError naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupted?): {e}") from None
    return tensors, meta


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in one rename.

    On any exception (Ctrl-C included) the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, _DIR_MODE)
        yield tmp
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(src: Path, dst: Path) -> None:
    """Rename the finished folder ``src`` to ``dst``, replacing an existing ``dst`` (moved aside
    first, then deleted), and fsync the parent."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    _fsync_dir(dst.parent)
