"""Device and dtype choice, from settings. No CUDA-only code runs on the CPU path."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: importable without pydantic-settings (bench.gpu_check on a bare GPU box)
    from core.settings import Settings

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(settings: Settings) -> torch.device:
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(settings: Settings, device: torch.device) -> torch.dtype:
    # fp32 beats bf16 for batched work on CPUs without AMX (measured 3.5-7x); bf16 on GPUs.
    if settings.dtype != "auto":
        return _DTYPES[settings.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def apply_thread_settings(settings: Settings) -> None:
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)


def release_openmp_pool() -> bool:
    """Release the calling thread's OpenMP worker threads (GNU OpenMP, as bundled with PyTorch's CPU builds).

    Why: libgomp keeps one worker pool per thread that ever ran a parallel torch op. Once the process holds
    more OpenMP threads than CPUs (the thread that loaded the model, plus the engine thread that decodes),
    libgomp throttles its spin-wait and every parallel op pays a sleep/wake-up: measured here, a decode step
    on the engine thread ran 20-30% slower while the loading thread's pool lingered, and the many small
    LoRA matmuls suffered most. Call it from a thread that is done with torch for now (it recreates its pool
    on its next parallel op). Returns False where there is nothing to release (no libgomp, e.g. macOS or an
    Intel OpenMP build; CUDA-only work).
    """
    pause = _omp_pause()
    return pause is not None and pause(_OMP_PAUSE_HARD) == 0


_OMP_PAUSE_HARD = 2


@functools.cache
def _omp_pause():
    """omp_pause_resource_all from the libgomp torch links against; None when unavailable."""
    candidates = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    for path in [*candidates, "libgomp.so.1"]:
        try:  # RTLD_NOLOAD: only the runtime torch already loaded, never a second copy
            function = ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
        return function
    logger.debug("No libgomp with omp_pause_resource_all: OpenMP pools are left as they are")
    return None
