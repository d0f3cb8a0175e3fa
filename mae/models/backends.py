"""Prove an attention backend before a run relies on it.

An optional kernel can import and still fail at its first call: an xformers wheel built for another torch
imports (printing "xFormers can't load C++/CUDA extensions") and raises NotImplementedError when called.
So every entry point and mae-bench runs a tiny forward + backward of each backend a model uses, on the run's
device and dtype, once per process, and moves a failing one down `FALLBACK` with one line saying why.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn as nn

from .vit import Attention, attend

FALLBACK = {"xformers": "sdpa", "sdpa": "math"}  # math is plain matmuls and softmax: nothing below it
# The pairs the xformers wheels on PyPI were built for (xformers' cpp_lib.json; all CUDA 12.8). Each wheel
# runs with that torch only; the `xformers` extra of pyproject.toml installs the newest pair.
XFORMERS_PAIRS = {"0.0.35": "2.10.0", "0.0.34": "2.10.0", "0.0.33.post2": "2.9.1", "0.0.32.post2": "2.8.0"}
XFORMERS_FIX = 'pip install -e ".[xformers]" installs the working pair xformers 0.0.35 + torch 2.10.0'


@functools.cache
def prove(backend: str, device: torch.device, dtype: torch.dtype, num_heads: int, head_dim: int) -> str:
    """'' when `backend` runs a forward + backward on (device, dtype), else why not (one line).

    Shapes (2 images, 16 tokens, `num_heads` x `head_dim`) are the model's, so a kernel that lacks a head
    size or a dtype is caught as well as one that lacks an operator. Cached: once per process.
    """
    try:
        # a generator of its own: the proof runs after a resumed run restored the global ones (drop path's)
        gen = torch.Generator(device=device).manual_seed(0)
        qkv = (
            torch.randn(2, 16, 3 * num_heads * head_dim, device=device, generator=gen)
            .to(dtype)
            .requires_grad_()
        )
        out = attend(qkv, num_heads, head_dim**-0.5, backend)
        out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernel launch errors surface here, not at the call
        if not bool(torch.isfinite(out).all()) or not bool(torch.isfinite(qkv.grad).all()):
            return "non-finite output or gradient"
    except Exception as e:  # noqa: BLE001  a broken optional kernel may raise anything
        first_line = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first_line[:160]}"
    return ""


def xformers_build() -> tuple[str, str]:
    """(installed xformers version, the torch its kernels were built for); '?' where unknown."""
    try:
        import xformers
    except Exception:  # noqa: BLE001
        return "?", "?"
    version = str(getattr(xformers, "__version__", "?"))
    try:
        built = json.loads((Path(xformers.__file__).parent / "cpp_lib.json").read_text())["version"]["torch"]
    except (OSError, ValueError, KeyError, TypeError):
        built = XFORMERS_PAIRS.get(version, "?")
    return version, str(built)


def explain(backend: str, fallback: str, error: str, device: torch.device, dtype: torch.dtype) -> str:
    """The one line a user sees when `backend` cannot run and `fallback` is used instead."""
    where = f"{device.type} {str(dtype).removeprefix('torch.')}"
    if backend != "xformers":
        return f"attention: {backend} cannot run on {where} ({error}); using {fallback}"
    version, built = xformers_build()
    if device.type != "cuda":
        fix = "xformers has CUDA kernels only; sdpa is the CPU path"
    else:
        fix = f"PyTorch's SDPA runs the flash and memory-efficient kernels itself; to use xformers: {XFORMERS_FIX}"
    return (
        f"attention: xformers {version} (built for torch {built}) cannot run on torch {torch.__version__}, "
        f"{where} ({error}); using {fallback}. {fix}"
    )


def ensure_attn_backends(model: nn.Module, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Prove every backend `model`'s attention layers use on (device, dtype); a layer whose backend fails
    moves down FALLBACK to the first one that works. Returns one line per backend replaced ([] = all run)."""
    notes: dict[str, str] = {}
    for m in model.modules():
        if not isinstance(m, Attention):
            continue
        head_dim = m.qkv.out_features // (3 * m.num_heads)
        backend = m.backend
        while error := prove(backend, torch.device(device), dtype, m.num_heads, head_dim):
            if backend not in FALLBACK:
                raise RuntimeError(f"attention backend {backend!r} cannot run on {device} {dtype}: {error}")
            notes.setdefault(backend, explain(backend, FALLBACK[backend], error, torch.device(device), dtype))
            backend = FALLBACK[backend]
        m.backend = backend
    return list(notes.values())
