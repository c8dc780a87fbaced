"""Device and dtype choice, from settings. No CUDA-only code runs on the CPU path."""

from __future__ import annotations

import logging

import torch

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
