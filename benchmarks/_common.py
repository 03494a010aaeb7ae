"""What every benchmark prints beside its figures: the machine, and the peak memory of this process."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    from rocketkit.runlog import vm_hwm_bytes

    return vm_hwm_bytes()


def peak_rss_mib() -> float:
    return peak_rss_bytes() / 2**20


def device_line() -> str:
    import torch

    load = os.getloadavg()
    return (f"device: {cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
