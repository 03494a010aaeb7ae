"""The work folder of a resumable compress run (``OUT.partial/`` next to the output by default).

Layout::

    manifest.json                      fingerprint of everything that determines the result
    lock                               flock'ed by the running process (rank 0)
    profiles/block-00003.{safetensors,json}   one block's profile (the .json is written last)
    cache/block-00003-g0.safetensors   block 3's whitening factors for pass 2 (whitening_cache.py)
    allocation.json                    the solved allocation
    blocks/block-00003.json            one block's factorization record (written after its shard)
    eval.json                          perplexities, when asked for
    attempts/attempt-0002-rank1.json   run logs (time, peak memory) of each attempt and rank
    checkpoint/                        the output folder being built; renamed to OUT when complete
        model-00004-of-00009.safetensors   block 2's tensors (block i is shard i + 2; shard 1
                                           holds the non-block weights, written at the end)

Every file is written atomically (temporary file + rename), so each one present is complete: a
run killed at any point restarts from the files that exist. A rerun whose fingerprint differs
from the manifest's is refused, naming what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

WORK_FORMAT_VERSION = 1
_MANIFEST_FORMAT = "rocketkit-work"


def default_work_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".partial")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(t) -> str:
    """sha256 of a tensor's dtype, shape and bytes (CPU copy)."""
    import torch

    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_folder_fingerprint(folder) -> dict:
    """Names and sizes of the files that define a model folder, and the config's sha256 (not the
    folder's path: ranks on different nodes may read copies at different paths)."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix in (".safetensors", ".json", ".model", ".txt", ".jinja"):
            files[p.name] = p.stat().st_size
    config = folder / "config.json"
    return {"files": files, "config_sha256": sha256_bytes(config.read_bytes())}


def model_memory_fingerprint(model) -> dict:
    """sha256 over every state-dict tensor of an in-memory model (cost: one read of the weights)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor_sha256(t).encode())
    return {"in_memory_state_sha256": h.hexdigest(), "config_sha256": sha256_bytes(model.config.to_json_string().encode())}


def _flatten(d, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two fingerprints, one per changed leaf."""
    a, b = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        if key not in b:
            changes.append(f"{key}: {a[key]!r} -> (absent)")
        elif key not in a:
            changes.append(f"{key}: (absent) -> {b[key]!r}")
        elif json.dumps(a[key]) != json.dumps(b[key]):
            changes.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return changes


class WorkDir:
    """Paths and completion markers of one work folder."""

    def __init__(self, root, n_blocks: int):
        self.root = Path(root)
        self.n_blocks = int(n_blocks)
        self.profiles = self.root / "profiles"
        self.blocks = self.root / "blocks"
        self.attempts = self.root / "attempts"
        self.checkpoint = self.root / "checkpoint"
        self.cache = self.root / "cache"
        self.manifest_path = self.root / "manifest.json"
        self.allocation_path = self.root / "allocation.json"
        self.eval_path = self.root / "eval.json"
        self.lock_path = self.root / "lock"
        self._lock_fd: int | None = None

    # ---- setup (rank 0) ---------------------------------------------------------------

    def open(self, fingerprint: dict, restart: bool) -> int:
        """Create or validate the folder for ``fingerprint``; returns this attempt's number (1 for a
        fresh folder). ``restart`` discards an existing folder first. Takes the lock."""
        from rocketkit.fileio import atomic_write_json, read_json, remove_stale_temporaries

        if self.root.exists() and (not self.root.is_dir() or (any(self.root.iterdir()) and not self.manifest_path.is_file())):
            # Never resume into, or delete, a folder rocketkit did not create.
            raise ValueError(f"{self.root}: exists and is not a rocketkit work folder (no manifest.json); "
                             "choose another --work-dir or remove it yourself")
        if restart and self.root.exists():
            self._take_lock()  # never discard the folder of a run that is still going
            self.release_lock()
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        attempt = 1
        if self.manifest_path.exists():
            doc = read_json(self.manifest_path)
            if doc.get("format") != _MANIFEST_FORMAT or doc.get("version") != WORK_FORMAT_VERSION:
                raise ValueError(f"{self.manifest_path}: not a rocketkit work manifest of version {WORK_FORMAT_VERSION} "
                                 "(pass --restart to discard this work folder)")
            changes = fingerprint_changes(doc.get("fingerprint", {}), fingerprint)
            if changes:
                shown = "\n  ".join(changes[:20]) + ("\n  ..." if len(changes) > 20 else "")
                raise ValueError(
                    f"{self.root}: holds an unfinished run with a different configuration; changed:\n  {shown}\n"
                    "Rerun with the original settings to resume it, pass --restart to discard it, "
                    "or choose another --out / --work-dir."
                )
            attempt = int(doc.get("attempts", 1)) + 1
        for folder in (self.root, self.profiles, self.blocks, self.attempts, self.checkpoint, self.cache):
            folder.mkdir(exist_ok=True)
            remove_stale_temporaries(folder)
        atomic_write_json(self.manifest_path, {"format": _MANIFEST_FORMAT, "version": WORK_FORMAT_VERSION,
                                               "n_blocks": self.n_blocks, "attempts": attempt,
                                               "fingerprint": fingerprint})
        return attempt

    def check_visible(self, fingerprint: dict, rank: int) -> int:
        """On ranks other than 0: the manifest rank 0 wrote must be visible (shared folder) and carry
        the same fingerprint. Returns the attempt number."""
        from rocketkit.fileio import read_json

        if not self.manifest_path.is_file():
            raise ValueError(f"rank {rank}: {self.manifest_path} is not visible; distributed compress needs "
                             "the output folder on a file system every rank shares")
        doc = read_json(self.manifest_path)
        changes = fingerprint_changes(doc.get("fingerprint", {}), fingerprint)
        if changes:
            raise ValueError(f"rank {rank} computes a different fingerprint than rank 0: " + "; ".join(changes[:5]))
        return int(doc["attempts"])

    def _take_lock(self) -> None:
        import fcntl

        if self._lock_fd is not None:
            return
        if not self.lock_path.exists():
            from rocketkit.fileio import atomic_write_bytes

            atomic_write_bytes(self.lock_path, b"")
        fd = os.open(self.lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ValueError(f"{self.root}: another rocketkit compress is working in this folder") from None
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- per-block files --------------------------------------------------------------

    def profile_stem(self, i: int) -> Path:
        return self.profiles / f"block-{i:05d}"

    def has_profile(self, i: int) -> bool:
        # Profile.save writes the .safetensors first and the .json last.
        stem = self.profile_stem(i)
        return stem.with_name(stem.name + ".json").is_file() and stem.with_name(stem.name + ".safetensors").is_file()

    def shard_name(self, shard: int) -> str:
        """File name of shard ``shard`` (0: non-block weights, i + 1: block i), HF's layout."""
        return f"model-{shard + 1:05d}-of-{self.n_blocks + 1:05d}.safetensors"

    def block_shard_path(self, i: int) -> Path:
        return self.checkpoint / self.shard_name(i + 1)

    def block_record_path(self, i: int) -> Path:
        return self.blocks / f"block-{i:05d}.json"

    def has_block(self, i: int) -> bool:
        """Block i's shard and record exist and the shard has the recorded size."""
        from rocketkit.fileio import read_json

        rec_path, shard = self.block_record_path(i), self.block_shard_path(i)
        if not rec_path.is_file() or not shard.is_file():
            return False
        rec = read_json(rec_path)
        return rec.get("shard") == shard.name and rec.get("bytes") == shard.stat().st_size

    def attempt_log_path(self, attempt: int, rank: int) -> Path:
        return self.attempts / f"attempt-{attempt:04d}-rank{rank}.json"
