"""Which device a command runs on and in what precision: `auto` is CUDA where present; bf16 where the hardware
runs it natively (recent GPUs; CPUs with avx512_bf16 or AMX)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(name: str | torch.device = "auto", error: type[Exception] = ValueError) -> torch.device:
    """`auto` (CUDA when present, else the CPU), `cpu`, `cuda`, `cuda:N`; a CUDA device asked for where there is
    none raises `error` in one line. (torch is imported here, not with the module: commands that name a device
    answer --help first.)"""
    import torch

    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise error(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device {device} asked for, but CUDA is not available")
    return device


def cpu_supports_bf16() -> bool:
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported()) or bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False
