"""Speed beside accuracy: what every `icd eval` records about the pipeline it evaluated.

Wrap only the pipeline calls (not data loading or metric code) in `SpeedMeter.timed(n_images)`;
`SpeedMeter.results()` gives the keys every results.json carries.
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager

import torch


class SpeedMeter:
    """Accumulates pipeline wall time and images, and reads the peak memory of the device."""

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 1):
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.seconds = 0.0
        self.images = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextmanager
    def timed(self, n_images: int):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - start
        self.images += n_images

    def peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        # The process's peak resident set: ru_maxrss is KiB on Linux, bytes on macOS.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10

    def results(self) -> dict:
        return {
            "device": str(self.device) if self.device.type != "cuda" else torch.cuda.get_device_name(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "batch_size": self.batch_size,
            "images_per_second": self.images / self.seconds if self.seconds > 0 else 0.0,
            "peak_memory_mb": self.peak_memory_mb(),
            "peak_memory_kind": "allocated on the GPU" if self.device.type == "cuda" else "process resident set (CPU)",
        }
