"""The configurations `mae-bench` measures, from its flags (every combination of the comma lists, or explicit
`--config` sets), timed round-robin next to a same-run GEMM peak; and the input-pipeline measurement."""

from __future__ import annotations

import itertools
import json
import sys

import torch

from mae.perf.step import (
    COMPILE_MODES,
    DTYPES,
    LOSS_PLACES,
    NOISE_SOURCES,
    OPTIMIZERS,
    BenchError,
    StepConfig,
    StepResult,
    matmul_peak,
    release,
    report,
    run_config,
)


def resolve_device(name: str) -> torch.device:
    from mae.device import resolve_device as resolve

    return resolve(name, BenchError)


def _split(value: str, kind=str) -> list:
    try:
        return [kind(v.strip()) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"{value!r} is not a comma-separated list of {kind.__name__} values") from None


def _compile_choice(value: str) -> tuple[bool, str]:
    """--compile value -> (compile, mode): off | on (= default) | a torch.compile mode."""
    if value.lower() in COMPILE_MODES:
        return True, value.lower()
    try:
        return _on_off(value), "default"
    except BenchError:
        raise BenchError(
            f"expected on or off (or a torch.compile mode: {', '.join(COMPILE_MODES)}), got {value!r}"
        ) from None


def _on_off(value: str) -> bool:
    v = value.lower()
    if v not in ("on", "off", "true", "false", "1", "0"):
        raise BenchError(f"expected on or off, got {value!r}")
    return v in ("on", "true", "1")


def resolve_dtypes(value: str, device: torch.device) -> list[str]:
    from mae.train.runtime import resolve_precision

    out = []
    for d in _split(value):
        if d not in (*DTYPES, "auto"):
            raise BenchError(f"--dtype {d!r}: expected fp32, bf16, fp16 or auto")
        if d == "fp16" and device.type != "cuda":
            raise BenchError("--dtype fp16 needs a CUDA device (the training loop refuses it on CPU)")
        out.append(resolve_precision(d, device.type == "cuda"))
    return list(dict.fromkeys(out))


def model_builder(args):
    """(StepConfig -> fresh MaskedAutoencoder, defaults from the recipe or the command line)."""
    from mae.models import create_mae

    if args.recipe:
        from mae.tasks import load_config
        from mae.weights.build import model_overrides

        rcfg = load_config([f"recipe={args.recipe}", *args.overrides])
        name, kw = rcfg.model.name, model_overrides(rcfg)
        defaults = dict(batch=str(rcfg.train.batch_size), img_size=str(rcfg.model.img_size),
                        mask_ratio=str(rcfg.model.mask_ratio))  # fmt: skip
    else:
        if args.overrides:
            raise BenchError(f"key=value overrides ({args.overrides[0]}) need --recipe")
        name, kw = args.model, {}
        defaults = dict(batch="16", img_size="224", mask_ratio="0.75")
    kw.pop("attn_backend", None)
    kw.pop("grad_checkpointing", None)

    def build(cfg: StepConfig):
        return create_mae(name, **{**kw, "img_size": cfg.img_size})

    try:  # fail fast on a bad name or override, before any timing
        create_mae(
            name, **{**kw, "img_size": int(_split(args.img_size or defaults["img_size"])[0]), "depth": 1}
        )
    except (ValueError, TypeError) as e:
        raise BenchError(str(e)) from None
    return name, build, defaults


def step_configs(args, defaults: dict, device: torch.device) -> list[StepConfig]:
    for kind in _split(args.optimizer):
        if kind not in OPTIMIZERS:
            raise BenchError(f"--optimizer {kind!r}: expected {', '.join(OPTIMIZERS)}")
    for a in _split(args.attn):
        if a not in ("sdpa", "math", "xformers"):
            raise BenchError(f"--attn {a!r}: expected sdpa, math or xformers")
    for flag, value, allowed in (("--loss", args.loss, LOSS_PLACES), ("--noise", args.noise, NOISE_SOURCES)):
        for v in _split(value):
            if v not in allowed:
                raise BenchError(f"{flag} {v!r}: expected {' or '.join(allowed)}")
    axes = {
        "batch": _split(args.batch or defaults["batch"], int),
        "img_size": _split(args.img_size or defaults["img_size"], int),
        "mask_ratio": _split(args.mask_ratio or defaults["mask_ratio"], float),
        "dtype": resolve_dtypes(args.dtype, device),
        "attn": _split(args.attn),
        "compile": [_compile_choice(v) for v in _split(args.compile)],
        "optimizer": _split(args.optimizer),
        "grad_ckpt": [_on_off(v) for v in _split(args.grad_ckpt)],
        "loss": _split(args.loss),
        "noise": _split(args.noise),
    }
    if not args.config:
        return [_step_config(dict(zip(axes, values))) for values in itertools.product(*axes.values())]
    return [
        _step_config({**{k: v[0] for k, v in axes.items()}, **_parse_config(c, device)}) for c in args.config
    ]


def _step_config(fields: dict) -> StepConfig:
    compile_, mode = fields.pop("compile")
    return StepConfig(**fields, compile=compile_, compile_mode=mode)


CONFIG_KEYS = ("batch", "img_size", "mask_ratio", "dtype", "attn", "compile", "optimizer", "grad_ckpt", "loss",
               "noise")  # fmt: skip
CONFIG_CHOICES = {"optimizer": OPTIMIZERS, "attn": ("sdpa", "math", "xformers"), "loss": LOSS_PLACES,
                  "noise": NOISE_SOURCES}  # fmt: skip


def _parse_config(text: str, device: torch.device) -> dict:
    """'dtype=bf16 attn=math compile=on' -> StepConfig fields (checked like the flags)."""
    out = {}
    for item in text.replace(",", " ").split():
        key, _, value = item.partition("=")
        if key not in CONFIG_KEYS or not value:
            raise BenchError(
                f"--config {text!r}: {item!r} is not KEY=VALUE with KEY in {', '.join(CONFIG_KEYS)}"
            )
        if key in ("batch", "img_size"):
            (out[key],) = _split(value, int)
        elif key == "mask_ratio":
            (out[key],) = _split(value, float)
        elif key == "compile":
            out[key] = _compile_choice(value)
        elif key == "grad_ckpt":
            out[key] = _on_off(value)
        elif key == "dtype":
            (out[key],) = resolve_dtypes(value, device)
        else:
            if value not in CONFIG_CHOICES[key]:
                raise BenchError(f"--config {text!r}: unknown {key} {value!r}")
            out[key] = value
    return out


def run_bench(args) -> dict:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        raise BenchError("--steps and --rounds must be >= 1, --warmup >= 0")
    name, build, defaults = model_builder(args)
    configs = step_configs(args, defaults, device)
    gemm = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    peaks = dict.fromkeys(sorted({c.dtype for c in configs}), 0.0)
    best: dict[StepConfig, StepResult] = {}
    for r in range(args.rounds):
        for dt in peaks:
            peaks[dt] = max(peaks[dt], matmul_peak(DTYPES[dt], device, gemm))
        for cfg in configs:
            print(f"round {r + 1}/{args.rounds}: {cfg.label()}", file=sys.stderr, flush=True)
            kw = {"profile": args.profile} if args.profile and r == 0 and cfg is configs[0] else {}
            try:
                res = run_config(build, cfg, device, args.steps, args.warmup, **kw)
            except torch.OutOfMemoryError:
                res = StepResult(cfg, error="out of memory")
                release(device)
            except Exception as e:  # noqa: BLE001  one failing configuration (a compile mode) keeps the others
                first_line = (str(e).strip().splitlines() or [""])[0]
                res = StepResult(cfg, error=f"{type(e).__name__}: {first_line[:120]}")
                print(f"  failed: {res.error}", file=sys.stderr, flush=True)
                release(device)
            prev = best.get(cfg)
            res.rounds = [*(prev.rounds if prev else []), round(res.img_per_s, 3)]
            if prev is not None:  # the first round's warm-up: later rounds reuse torch.compile's caches
                res.warmup_s = prev.warmup_s
            if prev is None or res.img_per_s > prev.img_per_s:
                best[cfg] = res
            else:
                prev.rounds = res.rounds
            if args.json:  # what is measured so far survives a time limit that stops the run
                write_json(args.json, report(args, device, name, gemm, peaks, [best[c] for c in best]))
    for dt in peaks:  # again at the end: a peak timed while the machine was busy would inflate MFU
        peaks[dt] = max(peaks[dt], matmul_peak(DTYPES[dt], device, gemm))
    return report(args, device, name, gemm, peaks, [best[c] for c in configs])


def run_data(args) -> dict:
    from mae.perf.data import bench_data
    from mae.tasks import load_config

    if args.workers < 0 or args.data_batches < 1:
        raise BenchError("--workers must be >= 0 and --data-batches >= 1")
    cfg = load_config([f"data.num_workers={args.workers}", "data.shuffle_buffer=256", *args.overrides]).data
    size = int(_split(args.img_size or "224")[0])
    batch = int(_split(args.batch or "32")[0])
    device = resolve_device(args.device)
    rows = bench_data(args.data, cfg, size, args.in_chans, batch, args.data_batches, args.workers,
                      decodes=tuple(_split(args.decode)), reference=args.reference, rounds=args.rounds,
                      device=device)  # fmt: skip
    return {"img_size": size, "batch": batch, "in_chans": args.in_chans, "device": str(device), "data": rows}


def write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
