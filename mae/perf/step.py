"""Timing the training step for `mae-bench`: the Trainer's own phases (mae.train.step.StepRunner) on a fresh
model per configuration, the analytic FLOPs of a MAE step, a same-run GEMM peak and the peak memory.

FLOPs are counted analytically (`mae_flops`): every matmul of the model (patch projection, all Linear
layers, the two attention products), encoder on the visible tokens + cls, decoder on all tokens + cls,
2 FLOPs per multiply-add; backward = 2x forward except the patch projection, whose input needs no
gradient (1x). Norms, activations, softmax and the optimizer are not counted. Recomputation under
gradient checkpointing is not counted either (MFU, not hardware FLOP utilisation).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fused-capturable: the fused kernel with its step count and hyperparameters kept on the device, so the whole
# update can be captured in a CUDA graph or compiled
OPTIMIZERS = ("fused", "fused-capturable", "foreach", "forloop")  # mae.train.optim.ADAMW_IMPLS but auto
# Where the MAE loss (norm_pix target included) is computed: in the model's forward, compiled with it, or
# eagerly after a compiled encoder + decoder.
LOSS_PLACES = ("graph", "eager")
# Where the masking noise comes from: drawn on the device, or as the training loop draws it (numpy Philox on
# the host, then a blocking copy, which waits for the device every step).
NOISE_SOURCES = ("device", "host")
# torch.compile modes; the two with CUDA graphs replay the whole compiled forward and backward as one graph
# (MAE's shapes are static: a fixed number of visible tokens), the others only generate fused kernels.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


class BenchError(ValueError):
    """A bad benchmark request (one line; exit code 2)."""


# ----------------------------------------------------------------------------------------------------------
# FLOPs


def _block_flops(block: nn.Module, tokens: int) -> int:
    """Forward matmul FLOPs of one pre-norm block on `tokens` tokens (per image)."""
    d = block.attn.qkv.in_features
    linear = sum(
        m.in_features * m.out_features
        for m in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2)
    )
    attention = 2 * tokens * tokens * d  # q k^T and attn v, summed over heads
    return 2 * (tokens * linear + attention)


def mae_flops(model: nn.Module, mask_ratio: float = 0.75) -> dict[str, int]:
    """Analytic matmul FLOPs per image of a MaskedAutoencoder training step.

    Returns forward FLOPs by stage (`patch_embed`, `encoder`, `decoder`), their sum `forward`, and
    `train_step` = forward + backward (2x forward, 1x for the patch projection whose input is data).
    """
    pe = model.patch_embed
    num_patches = pe.num_patches
    keep = int(num_patches * (1 - mask_ratio))
    t_enc, t_dec = 1 + keep, 1 + num_patches
    w = pe.proj.weight  # (D, C, p, q)
    patch_embed = 2 * num_patches * w.numel()
    encoder = sum(_block_flops(b, t_enc) for b in model.blocks)
    decoder = (
        2 * t_enc * model.decoder_embed.in_features * model.decoder_embed.out_features
        + sum(_block_flops(b, t_dec) for b in model.decoder_blocks)
        + 2 * t_dec * model.decoder_pred.in_features * model.decoder_pred.out_features
    )
    forward = patch_embed + encoder + decoder
    return {
        "patch_embed": patch_embed,
        "encoder": encoder,
        "decoder": decoder,
        "forward": forward,
        "train_step": 3 * forward - patch_embed,
    }


# ----------------------------------------------------------------------------------------------------------
# device helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int, min_seconds: float = 0.5) -> float:
    """Best FLOP/s of an (n x n) @ (n x n) GEMM in `dtype`, timed in batches of at least `min_seconds`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    _sync(device)
    reps, best = 1, 0.0
    for _ in range(4):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        _sync(device)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 * reps / dt)
        reps = max(reps, math.ceil(reps * min_seconds / max(dt, 1e-6)))
    return best


def _rss_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak memory of a block: the CUDA allocator's peak, or on CPU the process's resident peak (Linux
    VmHWM, reset through /proc/self/clear_refs). `baseline` is the usage when the block began; `reset()`
    restarts the peak from the current usage (after warm-up, so compilation does not count)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = self.peak = 0

    def reset(self) -> int:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages, so the reset starts low
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return _rss_hwm_bytes()

    def __enter__(self):
        self.baseline = self.reset()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _rss_hwm_bytes()
        return False


# ----------------------------------------------------------------------------------------------------------
# the training step


@dataclass(frozen=True)
class StepConfig:
    batch: int
    dtype: str = "bf16"  # fp32 | bf16 | fp16 (autocast; weights and optimizer stay fp32)
    attn: str = "sdpa"  # sdpa | math | xformers
    compile: bool = False
    compile_mode: str = "default"  # with compile: one of COMPILE_MODES
    optimizer: str = "fused"  # AdamW implementation: fused | foreach | forloop
    grad_ckpt: bool = False
    img_size: int = 224
    mask_ratio: float = 0.75
    loss: str = "graph"  # one of LOSS_PLACES
    noise: str = "device"  # one of NOISE_SOURCES

    def compile_label(self) -> str:
        """'off', 'on' (the default mode) or the mode's name."""
        if not self.compile:
            return "off"
        return "on" if self.compile_mode == "default" else self.compile_mode

    def label(self) -> str:
        return (
            f"{self.dtype} {self.attn} compile {self.compile_label()} {self.optimizer}"
            f"{' ckpt' if self.grad_ckpt else ''} b{self.batch} {self.img_size}px m{self.mask_ratio:g}"
            f"{' loss ' + self.loss if self.loss != 'graph' else ''}{' noise ' + self.noise if self.noise != 'device' else ''}"
        )


@dataclass
class StepResult:
    config: StepConfig
    attn_used: str = ""
    img_per_s: float = 0.0
    step_ms: float = 0.0
    tflops: float = 0.0
    mfu_measured: float = 0.0  # against the same-run GEMM peak of this dtype
    mfu_nominal: float | None = None  # against --peak-tflops
    peak_mem_gb: float = 0.0
    mem_per_img_mb: float = 0.0  # (peak of the timed steps - usage before the model was built) / batch
    gflop_per_img: float = 0.0
    warmup_s: float = 0.0  # the untimed warm-up steps of the first round (torch.compile compiles there)
    loss: float = 0.0
    error: str = ""
    rounds: list[float] = field(default_factory=list)


def bench_optimizer(model: nn.Module, impl: str) -> torch.optim.Optimizer:
    """The training loop's AdamW (mae.train.optim: its parameter groups, decay 0.05) in implementation `impl`."""
    from mae.train.optim import build_optimizer, param_groups

    return build_optimizer(param_groups(model, 0.05), "adamw", 1e-4, (0.9, 0.95), impl)


def make_step(
    model: nn.Module,
    optimizer,
    device: torch.device,
    dtype: str,
    mask_ratio: float,
    cudagraphs: bool = False,
    num_patches: int = 0,
    noise: str = "device",
    loss_fn=None,
):
    """The Trainer's step (mae.train.step.StepRunner: its forward / backward under an Accelerator of `dtype` on
    `device`, then the lr, clipping off, the optimizer step and zero_grad) as a closure (images) -> this step's
    loss; nothing is read back from the device.

    With `num_patches`, the masking noise (N, L) is an input of the model, as in the loop: drawn on the device
    (`noise="device"`) or exactly as the pretraining task draws it (`"host"`: numpy Philox on the host, then a
    blocking copy); else the model draws it. With `loss_fn`, `model` returns (pred, mask) and the loss is
    loss_fn(images, pred, mask), outside it. With `cudagraphs` (a compiled model replayed as CUDA graphs) each
    call starts a new graph step; the loss returned is a copy, which the next replay cannot overwrite."""
    from mae.tasks.pretrain import masking_noise
    from mae.train.runtime import local_accelerator
    from mae.train.step import StepRunner

    acc = local_accelerator(dtype, device)
    prepared, prepared_opt = acc.prepare(model, optimizer)
    count = [0]

    def loss(m, images, labels, step: int, micro: int) -> torch.Tensor:
        kw = {}
        if num_patches and noise == "host":
            kw["noise"] = masking_noise(images, num_patches, 0, 0, step, micro)
        elif num_patches:
            kw["noise"] = torch.rand(images.shape[0], num_patches, device=images.device)
        if loss_fn is None:
            return m(images, mask_ratio=mask_ratio, **kw)[0]
        pred, mask = m(images, mask_ratio, **kw)
        return loss_fn(images, pred, mask)

    runner = StepRunner(acc, prepared, model, prepared_opt, loss)

    def step(images: torch.Tensor) -> torch.Tensor:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        labels = images.new_zeros(images.shape[0], dtype=torch.int64)
        runner.loss_sum.zero_()
        runner.forward_backward(images, labels, count[0], 0)
        runner.optimizer_step(1e-4)
        count[0] += 1
        return runner.loss_sum.clone()

    return step


class PredictOnly(nn.Module):
    """A MaskedAutoencoder's encoder and decoder without its loss: (imgs, mask_ratio, noise) -> (pred, mask)."""

    def __init__(self, mae: nn.Module):
        super().__init__()
        self.mae = mae

    def forward(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        latent, mask, ids_restore = self.mae.forward_encoder(imgs, mask_ratio, noise)
        return self.mae.forward_decoder(latent, ids_restore), mask


def run_config(
    build_model, cfg: StepConfig, device: torch.device, steps: int, warmup: int, profile: str = ""
) -> StepResult:
    """Build a fresh model + optimizer for `cfg`, run `warmup` untimed steps, then time `steps` steps. With
    `profile`, a few more steps run under torch.profiler and their top ops go to that file."""
    from mae.models import ensure_attn_backends, set_attn_backend

    res = StepResult(cfg)
    with PeakMemory(device) as mem:
        model = build_model(cfg).to(device).train()
        set_attn_backend(model, cfg.attn)
        for note in ensure_attn_backends(model, device, DTYPES[cfg.dtype]):
            say_once(note)
        res.attn_used = getattr(model.blocks[0].attn, "backend", "own")  # a foreign model: its own attention
        if hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(cfg.grad_ckpt)
        res.gflop_per_img = mae_flops(model, cfg.mask_ratio)["train_step"] / 1e9
        optimizer = bench_optimizer(model, cfg.optimizer)
        if cfg.compile:
            torch._dynamo.reset()  # a fresh model per configuration: start below the recompile limit
        loss_fn = None
        runner = model
        if cfg.loss == "eager":
            runner, loss_fn = PredictOnly(model), model.forward_loss
        if cfg.compile:
            runner = torch.compile(runner, mode=cfg.compile_mode)
        cudagraphs = cfg.compile and cfg.compile_mode in CUDAGRAPH_MODES and device.type == "cuda"
        step = make_step(runner, optimizer, device, cfg.dtype, cfg.mask_ratio, cudagraphs,
                         num_patches=model.patch_embed.num_patches, noise=cfg.noise, loss_fn=loss_fn)  # fmt: skip
        c, h = model.patch_embed.proj.in_channels, cfg.img_size
        images = torch.randn(cfg.batch, c, h, h, device=device)
        t0 = time.perf_counter()
        for _ in range(warmup):
            step(images)
        _sync(device)
        res.warmup_s = time.perf_counter() - t0
        mem.reset()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step(images)
        _sync(device)
        dt = time.perf_counter() - t0
        res.loss = float(loss)
    if profile:
        from mae.perf.profile import profile_steps

        params = sum(p.numel() for p in model.parameters()) / 1e6
        try:
            profile_steps(step, images, device, profile,
                          title=f"{type(model).__name__} ({params:.1f}M parameters), {cfg.label()}")  # fmt: skip
        except Exception as e:  # noqa: BLE001  the profile is extra: the timed numbers stand without it
            say_once(f"profile failed: {type(e).__name__}: {e}")
    res.step_ms = dt / steps * 1e3
    res.img_per_s = cfg.batch * steps / dt
    res.peak_mem_gb = mem.peak / 2**30
    res.mem_per_img_mb = (mem.peak - mem.baseline) / cfg.batch / 2**20
    del step, runner, optimizer, model, images
    return res


def report(args, device, name: str, gemm: int, peaks: dict, results: list[StepResult]) -> dict:
    for res in results:
        res.tflops = res.img_per_s * res.gflop_per_img / 1e3
        res.mfu_measured = res.tflops * 1e12 / peaks[res.config.dtype] if peaks[res.config.dtype] else 0.0
        if args.peak_tflops:
            res.mfu_nominal = res.tflops / args.peak_tflops
    return {
        "device": _device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": name,
        "recipe": args.recipe,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "matmul_size": gemm,
        "matmul_peak_tflops": {k: v / 1e12 for k, v in peaks.items()},
        "nominal_peak_tflops": args.peak_tflops or None,
        "results": [{**asdict(r), "config": asdict(r.config)} for r in results],
    }


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def format_table(report: dict) -> str:
    peaks = ", ".join(f"{k} {v:.3f}" for k, v in report["matmul_peak_tflops"].items())
    recipe = f" (recipe {report['recipe']})" if report["recipe"] else ""
    lines = [
        f"{report['model']}{recipe} on {report['device']}, {report['threads']} threads, torch {report['torch']}; "
        f"{report['steps']} timed steps after {report['warmup']} warm-up, best of {report['rounds']} round(s)",
        f"measured GEMM peak ({report['matmul_size']}^3) TFLOP/s: {peaks}",
    ]
    nominal = report["nominal_peak_tflops"] is not None
    configs = [StepConfig(**r["config"]) for r in report["results"]]
    places = any(c.loss != "graph" or c.noise != "device" for c in configs)  # columns only when they vary
    head = ["dtype", "attn", "compile", "adamw", "ckpt", *(["loss", "noise"] if places else []), "batch", "px",
            "mask", "GFLOP/img", "img/s", "ms/step", "TFLOP/s", "MFU", *(["MFU nom"] if nominal else []), "peak GB",
            "MB/img", "warm-up s"]  # fmt: skip
    rows = []
    for r, c in zip(report["results"], configs):
        row = [c.dtype, r["attn_used"] or c.attn, c.compile_label(), c.optimizer, "on" if c.grad_ckpt else "off",
               *([c.loss, c.noise] if places else []), str(c.batch), str(c.img_size), f"{c.mask_ratio:g}"]  # fmt: skip
        if r["error"]:
            rows.append(row + [r["error"]])
            continue
        row += [f"{r['gflop_per_img']:.2f}", f"{r['img_per_s']:.2f}", f"{r['step_ms']:.1f}", f"{r['tflops']:.4f}",
                f"{100 * r['mfu_measured']:.1f}%"]  # fmt: skip
        if nominal:
            row.append(f"{100 * r['mfu_nominal']:.1f}%")
        row += [f"{r['peak_mem_gb']:.2f}", f"{r['mem_per_img_mb']:.1f}", f"{r['warmup_s']:.1f}"]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows if i < len(r))) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    lines += [fmt(head), *(fmt(r) for r in rows)]
    return "\n".join(lines)


@functools.cache
def say_once(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
