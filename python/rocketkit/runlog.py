"""Progress log of a run: wall time and peak memory per stage and per decoder block, as JSON.

Peak RSS per entry comes from /proc/self/status VmHWM, reset at the start of each entry through
/proc/self/clear_refs where Linux allows it ("rss_peak_scope": "entry"); elsewhere it is the
process-lifetime peak from getrusage ("process"). On CUDA the entry's
torch.cuda.max_memory_allocated is recorded too (reset at the start of each entry). Entries nest
(a stage around its blocks): before any reset the current high-water marks are credited to every
open entry, so an outer entry's peak covers its inner ones.
The file is rewritten atomically after every entry, so a killed run leaves a valid log.
Resetting VmHWM also lowers what getrusage reports as ru_maxrss (though not below a parent's peak
inherited across exec), so the run's true peak is kept here (``RunLog.peak_rss_bytes``, saved as
"peak_rss_bytes").
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path
from typing import Iterator

_KIB = 1024


def _read_status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def process_peak_rss_bytes() -> int:
    """Lifetime peak RSS of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * _KIB)


def vm_hwm_bytes() -> int:
    """This process's own peak RSS (VmHWM). Unlike ru_maxrss it starts afresh at exec: Linux
    carries the parent's high-water mark into ru_maxrss across fork + exec. Falls back to
    ru_maxrss where /proc is missing."""
    kib = _read_status_kib("VmHWM")
    return kib * _KIB if kib is not None else process_peak_rss_bytes()


def current_rss_bytes() -> int | None:
    kib = _read_status_kib("VmRSS")
    return None if kib is None else kib * _KIB


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class RunLog:
    """Collects ``{"stages": [...], "blocks": [...]}`` entries; each has ``name``, ``seconds``,
    ``peak_rss_bytes`` (see module doc), ``rss_bytes`` at the end, ``cuda_max_allocated_bytes`` when
    CUDA is in use, plus any keyword fields the caller passes. ``path=None`` keeps it in memory only."""

    def __init__(self, path: str | os.PathLike | None = None, **meta):
        self.path = Path(path) if path is not None else None
        self.data: dict = {
            "meta": {"python": platform.python_version(), "machine": platform.machine(), **meta},
            "stages": [],
            "blocks": [],
        }
        self._peak = 0
        self._open: list[dict] = []  # entries being measured, outermost first (a stage around its blocks)

    @property
    def peak_rss_bytes(self) -> int:
        """The process's peak RSS so far, including the peaks that per-entry resets cleared. From
        VmHWM where /proc has it: ru_maxrss would carry a bigger parent's peak across fork + exec."""
        hwm = _read_status_kib("VmHWM")
        return max(self._peak, hwm * _KIB if hwm is not None else process_peak_rss_bytes())

    def _fold_peaks(self, cuda: bool) -> None:
        """Credit the current high-water marks (VmHWM: the peak since the last reset) to every open
        entry before a reset clears them."""
        hwm = _read_status_kib("VmHWM")
        rss = hwm * _KIB if hwm is not None else process_peak_rss_bytes()
        self._peak = max(self._peak, rss)
        cuda_peak = None
        if cuda:
            import torch

            cuda_peak = int(torch.cuda.max_memory_allocated())
        for e in self._open:
            e["_rss"] = max(e.get("_rss", 0), rss)
            if cuda_peak is not None:
                e["_cuda"] = max(e.get("_cuda", 0), cuda_peak)

    @contextlib.contextmanager
    def _measure(self, kind: str, entry: dict) -> Iterator[dict]:
        cuda = _cuda_available()
        self._fold_peaks(cuda)
        scoped = reset_peak_rss() and _read_status_kib("VmHWM") is not None
        if cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._open.append(entry)
        t0 = time.perf_counter()
        try:
            yield entry  # callers may add fields while the entry runs
        finally:
            entry["seconds"] = time.perf_counter() - t0
            cuda = cuda or _cuda_available()
            self._fold_peaks(cuda)
            self._open.remove(entry)
            entry["peak_rss_bytes"] = entry.pop("_rss")
            entry["rss_peak_scope"] = "entry" if scoped else "process"
            entry["rss_bytes"] = current_rss_bytes()
            cuda_peak = entry.pop("_cuda", None)
            if cuda_peak is not None:
                entry["cuda_max_allocated_bytes"] = cuda_peak
            self.data[kind].append(entry)
            self.save()

    def stage(self, name: str, **fields) -> contextlib.AbstractContextManager[dict]:
        """``with log.stage("allocate"): ...``"""
        return self._measure("stages", {"name": name, **fields})

    def block(self, index: int, name: str | None = None, **fields) -> contextlib.AbstractContextManager[dict]:
        """``with log.block(i, cb.name): ...`` around the work on one decoder block."""
        return self._measure("blocks", {"index": int(index), "name": name, **fields})

    def save(self) -> None:
        self.data["peak_rss_bytes"] = self.peak_rss_bytes
        if self.path is not None:
            from rocketkit.fileio import atomic_write_json

            atomic_write_json(self.path, self.data)

    def to_dict(self) -> dict:
        self.data["peak_rss_bytes"] = self.peak_rss_bytes
        return self.data
