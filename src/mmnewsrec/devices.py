"""Devices and precision: one place that checks a device name, resolves it and picks autocast.

torch is imported on use, so configuration code can check a device name without loading it.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(name: str) -> str:
    """`name` if it is auto, cpu, cuda or cuda:N; ValueError otherwise."""
    if not DEVICE_NAME.fullmatch(name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {name!r}")
    return name


def resolve_device(
    device: str | torch.device = "auto", local_rank: int | None = None
) -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else as given (checked).

    With `local_rank` (a torchrun process), a CUDA device without an index means cuda:LOCAL_RANK.
    """
    import torch

    if str(device) == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        resolved = torch.device(device)
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    if local_rank is not None and resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    return resolved


def effective_precision(device: torch.device, precision: str = "auto") -> str:
    """fp32 on CPU (half precision is slow there); on GPU `auto` -> bf16 if supported, else fp16."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if device.type != "cuda":
        if precision not in ("auto", "fp32"):
            logger.warning("precision %s ignored on %s; using fp32", precision, device)
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def half_dtype(precision: str) -> torch.dtype | None:
    """torch dtype of fp16 / bf16; None for fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `precision` on `device`: None (fp32) on CPU."""
    return half_dtype(effective_precision(device, precision))


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[object]:
    """bf16/fp16 autocast on CUDA when `dtype` is set; a no-op context otherwise."""
    import torch

    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


@contextlib.contextmanager
def inference(device: torch.device, precision: str) -> Iterator[None]:
    """`torch.inference_mode`, plus autocast to fp16/bf16 on GPU when `precision` says so."""
    import torch

    with torch.inference_mode(), autocast(device, half_dtype(precision)):
        yield
