"""Attention backends are proven before use: a broken optional kernel (an xformers wheel built for another
torch, which imports and raises at its first call) never crashes a run; the run says why and uses SDPA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mae.models import Attention, backends, create_mae, ensure_attn_backends, resolve_attn_backend
from mae.models import vit as vit_module

ROOT = Path(__file__).resolve().parents[1]
FAKE = Path(__file__).resolve().parent / "fake_xformers"
TINY = dict(img_size=32, patch_size=8)  # encoder 3 heads of 64, decoder 4 heads of 32


def _forget_xformers() -> None:
    for name in [m for m in sys.modules if m == "xformers" or m.startswith("xformers.")]:
        del sys.modules[name]
    vit_module._xformers_ops.cache_clear()
    vit_module._warn_once.cache_clear()
    backends.prove.cache_clear()


@pytest.fixture
def broken_xformers(monkeypatch):
    """The fake wheel first on sys.path; imported fresh, forgotten afterwards."""
    _forget_xformers()
    monkeypatch.syspath_prepend(str(FAKE))
    monkeypatch.delenv("MAE_ATTN_BACKEND", raising=False)
    import xformers.ops

    xformers.ops.CALLS.clear()
    yield xformers.ops
    _forget_xformers()


def backends_of(model) -> set[str]:
    return {m.backend for m in model.modules() if isinstance(m, Attention)}


def test_broken_xformers_falls_back_to_sdpa_with_one_line(broken_xformers):
    torch.manual_seed(0)
    model = create_mae("mae_vit_tiny_patch16", attn_backend="xformers", **TINY)
    assert backends_of(model) == {"xformers"}  # it imports, so it is taken at its word until proven
    notes = ensure_attn_backends(model, torch.device("cpu"), torch.bfloat16)
    assert backends_of(model) == {"sdpa"}
    (note,) = notes
    assert "\n" not in note
    for part in ("xformers 0.0.35", "built for torch 2.10.0+cu128", f"torch {torch.__version__}", "cpu bfloat16",
                 "NotImplementedError: No operator found", "using sdpa"):  # fmt: skip
        assert part in note, (part, note)
    # the model trains, and exactly as an SDPA model with the same weights
    ref = create_mae("mae_vit_tiny_patch16", attn_backend="sdpa", **TINY)
    ref.load_state_dict(model.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss = model(imgs, noise=noise)[0]
    loss.backward()
    assert torch.equal(loss, ref(imgs, noise=noise)[0])


def test_each_backend_is_proven_once_per_process(broken_xformers):
    model = create_mae("mae_vit_tiny_patch16", attn_backend="xformers", **TINY)
    ensure_attn_backends(model, torch.device("cpu"), torch.float32)
    assert sorted(broken_xformers.CALLS) == [(3, 64), (4, 32)]  # one call per (heads, head size) of the model
    again = create_mae("mae_vit_tiny_patch16", attn_backend="xformers", **TINY)
    assert len(ensure_attn_backends(again, torch.device("cpu"), torch.float32)) == 1
    assert backends_of(again) == {"sdpa"} and len(broken_xformers.CALLS) == 2


def test_auto_is_sdpa_even_where_xformers_imports(broken_xformers):
    assert vit_module._xformers_ops() is not None
    assert resolve_attn_backend("auto") == "sdpa"
    assert backends_of(create_mae("mae_vit_tiny_patch16", **TINY)) == {"sdpa"}


def test_failing_sdpa_falls_back_to_math(monkeypatch):
    backends.prove.cache_clear()

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this head size")

    monkeypatch.setattr(F, "scaled_dot_product_attention", broken)
    model = create_mae("mae_vit_tiny_patch16", attn_backend="sdpa", **TINY)
    (note,) = ensure_attn_backends(model, torch.device("cpu"), torch.float32)
    backends.prove.cache_clear()
    assert backends_of(model) == {"math"}
    assert (
        note
        == "attention: sdpa cannot run on cpu float32 (RuntimeError: no kernel for this head size); using math"
    )


def test_working_backends_are_left_alone():
    backends.prove.cache_clear()
    for name in ("sdpa", "math"):
        model = create_mae("mae_vit_tiny_patch16", attn_backend=name, **TINY)
        assert ensure_attn_backends(model, torch.device("cpu"), torch.bfloat16) == []
        assert backends_of(model) == {name}


def test_models_package_imports_nothing_else_of_mae():
    code = "import sys, mae.models; print(sorted(m for m in sys.modules if m.startswith('mae')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert all(m == "mae" or m.startswith("mae.models") for m in eval(out.stdout)), out.stdout


def test_bench_runs_on_sdpa_and_says_why(broken_xformers, tmp_path, capsys):
    from mae.bench import main

    out = tmp_path / "bench.json"
    argv = ["--model", "mae_vit_tiny_patch16", "--img-size", "32", "--matmul-size", "64", "--steps", "1",
            "--warmup", "0", "--batch", "2", "--dtype", "fp32", "--attn", "xformers,sdpa", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert [r["attn_used"] for r in json.loads(out.read_text())["results"]] == ["sdpa", "sdpa"]
    err = capsys.readouterr().err
    assert err.count("attention: xformers 0.0.35") == 1


TRANSFER_ARGS = [
    "model.img_size=28", "model.patch_size=7", "model.in_chans=1", "model.embed_dim=32", "model.depth=1",
    "model.num_heads=2", "data.train=synthetic", "data.val=", "data.synthetic_samples=32", "data.epoch_samples=0",
    "data.num_workers=0", "data.mean=[0.5]", "data.std=[0.25]", "train.batch_size=8", "train.max_steps=1",
    "train.precision=fp32", "log.progress=false", "log.wandb=disabled",
]  # fmt: skip


@pytest.mark.parametrize("entry, recipe", [("finetune", "finetune_demo"), ("linprobe", "linprobe_demo")])
def test_transfer_entry_points_run_on_sdpa_and_say_why(
    broken_xformers, monkeypatch, tmp_path, capsys, entry, recipe
):
    import importlib

    main = importlib.import_module(f"mae.{entry}").main
    monkeypatch.setenv("MAE_ATTN_BACKEND", "xformers")
    assert main([f"recipe={recipe}", *TRANSFER_ARGS, f"output_dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    assert out.count("attention: xformers 0.0.35 (built for torch 2.10.0+cu128) cannot run") == 1, out
    assert (tmp_path / "run" / "checkpoint-last").exists()


@pytest.mark.slow
def test_pretrain_subprocess_with_a_broken_xformers_installed(tmp_path):
    """As a user meets it: the broken wheel importable, xformers asked for through the environment."""
    env = {**os.environ, "PYTHONPATH": f"{FAKE}{os.pathsep}{ROOT}", "MAE_ATTN_BACKEND": "xformers",
           "WANDB_MODE": "disabled"}  # fmt: skip
    cmd = [sys.executable, "mae/pretrain.py", "data.train=synthetic", "data.synthetic_samples=32",
           "data.num_workers=0", "model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8",
           "model.depth=1", "model.decoder_depth=1", "train.batch_size=8", "train.max_steps=2",
           "train.precision=bf16", "log.viz_images=0", "log.progress=false", f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("attention: ")]
    assert len(lines) == 1 and "xformers 0.0.35 (built for torch 2.10.0+cu128)" in lines[0], r.stdout
    assert "using sdpa" in lines[0] and "Traceback" not in r.stderr
    assert (tmp_path / "run" / "checkpoint-last").exists()
