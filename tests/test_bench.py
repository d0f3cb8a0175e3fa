"""mae-bench: the analytic FLOP count, the measured quantities and their relations, the command line."""

import json

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from mae.bench import main
from mae.models import create_mae
from mae.perf.step import PeakMemory, mae_flops, matmul_peak
from mae.perf.step import bench_optimizer as build_optimizer

TINY = ["--model", "mae_vit_tiny_patch16", "--img-size", "32", "--matmul-size", "128", "--steps", "1"]


def counted_flops(model, imgs, mask_ratio, backward):
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = model(imgs, mask_ratio=mask_ratio)
        if backward:
            loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "overrides, mask_ratio",
    [
        (dict(img_size=32, patch_size=8), 0.75),
        (dict(img_size=28, patch_size=4, in_chans=1, depth=2, decoder_depth=1), 0.5),
        (dict(img_size=42, patch_size=14, decoder_embed_dim=96, decoder_num_heads=3), 0.9),
    ],
)
def test_analytic_flops_equal_torch_flop_counter(overrides, mask_ratio):
    # Both count 2 FLOPs per multiply-add of the same matmuls (conv, Linear, the two attention products on
    # the explicit 'math' path, which the counter sees as bmm), so they must agree exactly; any difference
    # is a layer counted wrongly. Backward: the counter sees no input gradient for the patch projection.
    torch.manual_seed(0)
    model = create_mae("mae_vit_tiny_patch16", attn_backend="math", **overrides)
    c, s = model.patch_embed.proj.in_channels, model.patch_embed.img_size[0]
    imgs = torch.randn(2, c, s, s)
    ours = mae_flops(model, mask_ratio)
    assert counted_flops(model, imgs, mask_ratio, backward=False) == 2 * ours["forward"]
    assert counted_flops(model, imgs, mask_ratio, backward=True) == 2 * ours["train_step"]
    assert ours["forward"] == ours["patch_embed"] + ours["encoder"] + ours["decoder"]


def test_encoder_flops_follow_the_visible_tokens():
    model = create_mae("mae_vit_tiny_patch16", img_size=64, patch_size=8)  # 64 patches
    f0, f75 = mae_flops(model, 0.0), mae_flops(model, 0.75)
    assert f0["patch_embed"] == f75["patch_embed"]
    assert f0["decoder"] - f75["decoder"] == 2 * (65 - 17) * 192 * 128  # only decoder_embed sees fewer tokens
    assert f75["encoder"] < f0["encoder"] / 3  # 17 tokens instead of 65 (attention shrinks quadratically)


def test_vit_base_matches_the_paper_scale_count():
    # MAE ViT-B/16, 224 px, 75% masked: 56.3 GFLOP per image and step without the attention products
    # (the usual 6 x params x tokens style count); ours adds q k^T and attn v of every block.
    f = mae_flops(create_mae("mae_vit_base_patch16", depth=12), 0.75)
    attention = 3 * (12 * 4 * 50 * 50 * 768 + 8 * 4 * 197 * 197 * 512)
    assert f["train_step"] - attention == pytest.approx(56.3e9, rel=1e-3)


def test_matmul_peak_is_a_rate():
    peak = matmul_peak(torch.float32, torch.device("cpu"), n=128, min_seconds=0.01)
    assert 1e6 < peak < 1e14


def test_peak_memory_sees_a_large_allocation_after_the_reset_only():
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched: before the reset (warm-up, compilation)
        del x
        mem.reset()
        y = torch.ones(64 * 2**20 // 4)  # 64 MiB during the timed part
        del y
    assert 60 * 2**20 <= mem.peak - mem.baseline < 200 * 2**20


@pytest.mark.parametrize("kind, flag", [("fused", "fused"), ("foreach", "foreach")])
def test_optimizer_kinds(kind, flag):
    opt = build_optimizer(create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8), kind)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults[flag]
    decays = sorted({g["weight_decay"] for g in opt.param_groups})
    assert decays == [0.0, 0.05]  # the training loop's groups: no decay on norms, biases, tokens


def test_cli_measures_every_combination(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main([*TINY, "--batch", "2", "--dtype", "fp32,bf16", "--attn", "math,sdpa", "--warmup", "0",
               "--peak-tflops", "1.5", "--json", str(out)])  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    got = {(r["config"]["dtype"], r["config"]["attn"]) for r in report["results"]}
    assert got == {("fp32", "math"), ("fp32", "sdpa"), ("bf16", "math"), ("bf16", "sdpa")}
    gflop = mae_flops(create_mae("mae_vit_tiny_patch16", img_size=32), 0.75)["train_step"] / 1e9
    for r in report["results"]:
        peak = report["matmul_peak_tflops"][r["config"]["dtype"]]
        assert r["img_per_s"] > 0 and r["gflop_per_img"] == pytest.approx(gflop)
        assert r["tflops"] == pytest.approx(r["img_per_s"] * gflop / 1e3)
        assert r["mfu_measured"] == pytest.approx(r["tflops"] / peak)
        assert r["mfu_nominal"] == pytest.approx(r["tflops"] / 1.5)
        assert r["step_ms"] == pytest.approx(2e3 / r["img_per_s"])
        assert r["peak_mem_gb"] > 0 and r["loss"] > 0
    table = capsys.readouterr().out
    assert "MFU nom" in table and table.count(" math ") == 2 and table.count(" sdpa ") == 2


def test_cli_explicit_configs_fill_unset_keys_from_the_flags(tmp_path):
    out = tmp_path / "configs.json"
    rc = main([*TINY, "--batch", "2", "--dtype", "fp32", "--attn", "sdpa", "--warmup", "0", "--json", str(out),
               "--config", "attn=math optimizer=forloop", "--config", "batch=3 mask_ratio=0.5"])  # fmt: skip
    assert rc == 0
    got = [r["config"] for r in json.loads(out.read_text())["results"]]
    assert [(c["attn"], c["optimizer"], c["batch"], c["mask_ratio"]) for c in got] == [
        ("math", "forloop", 2, 0.75),
        ("sdpa", "fused", 3, 0.5),
    ]
    assert all(c["dtype"] == "fp32" and not c["compile"] for c in got)


def test_cli_takes_model_batch_and_mask_from_a_recipe(tmp_path):
    out = tmp_path / "demo.json"
    rc = main(["--recipe", "demo", "model.depth=1", "--batch", "4", "--steps", "1", "--warmup", "0",
               "--matmul-size", "128", "--dtype", "fp32", "--json", str(out)])  # fmt: skip
    assert rc == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["config"]["img_size"] == 28 and r["config"]["mask_ratio"] == 0.75
    model = create_mae("mae_vit_tiny_patch16", img_size=28, patch_size=4, in_chans=1, depth=1,
                       decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)  # fmt: skip
    assert r["gflop_per_img"] == pytest.approx(mae_flops(model, 0.75)["train_step"] / 1e9)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtype", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
        (["--dtype", "int8"], "--dtype 'int8'"),
        (["--attn", "flash"], "--attn 'flash'"),
        (["--optimizer", "sgd"], "--optimizer 'sgd'"),
        (["--compile", "maybe"], "expected on or off"),
        (["--model", "mae_vit_bse_patch16"], "did you mean mae_vit_base_patch16"),
        (["model.depth=2"], "need --recipe"),
        (["--recipe", "nope"], "recipe 'nope' not found"),
        (["--recipe", "demo", "model.dept=2"], "model.dept"),
        (["--steps", "0"], "--steps"),
        (["--config", "attn=flash"], "unknown attn 'flash'"),
        (["--config", "colour=red"], "'colour=red' is not KEY=VALUE"),
        (["--batch", "8,x"], "'8,x' is not a comma-separated list of int"),
        (["--config", "mask_ratio=high"], "'high' is not a comma-separated list of float"),
    ],
)
def test_cli_bad_input_is_one_line(argv, message, capsys):
    assert main([*TINY, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_data_mode_rates_folder_and_synthetic(tmp_path):
    for i in range(12):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 40), (i * 20, 50, 100)).save(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.png")
    out = tmp_path / "data.json"
    argv = ["--data", str(tmp_path / "imgs"), "synthetic", "--img-size", "32", "--batch", "4"]
    assert main([*argv, "--data-batches", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["data"]
    assert [r["source"] for r in rows] == [str(tmp_path / "imgs"), "synthetic"]
    for r in rows:
        assert r["images"] == 8 and r["img_per_s"] > 0 and r["img_per_s_per_worker"] == r["img_per_s"]


def test_data_mode_missing_source(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_compile_modes_parse_into_configs_and_labels():
    from mae.bench import parse_args
    from mae.perf.grid import step_configs

    args = parse_args(["--compile", "off,on,max-autotune-no-cudagraphs,reduce-overhead", "--device", "cpu"])
    configs = step_configs(args, dict(batch="2", img_size="32", mask_ratio="0.75"), torch.device("cpu"))
    assert [(c.compile, c.compile_mode, c.compile_label()) for c in configs] == [
        (False, "default", "off"),
        (True, "default", "on"),
        (True, "max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
        (True, "reduce-overhead", "reduce-overhead"),
    ]
    (explicit,) = step_configs(
        parse_args(["--config", "compile=max-autotune"]), dict(batch="2", img_size="32", mask_ratio="0.75"),
        torch.device("cpu"),
    )  # fmt: skip
    assert explicit.compile and explicit.compile_mode == "max-autotune"


def test_json_holds_each_configuration_as_soon_as_it_is_measured(tmp_path, monkeypatch):
    # a time limit that stops the run after the first configuration keeps that configuration's numbers
    import mae.perf.grid as bench

    real, calls = bench.run_config, []

    def stop_at_second(build, cfg, device, steps, warmup):
        calls.append(cfg)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a stop signal does to a run: not one failing configuration
        return real(build, cfg, device, steps, warmup)

    monkeypatch.setattr(bench, "run_config", stop_at_second)
    out = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        main(
            [
                *TINY,
                "--batch",
                "2",
                "--dtype",
                "fp32",
                "--attn",
                "math,sdpa",
                "--warmup",
                "0",
                "--json",
                str(out),
            ]
        )
    (row,) = json.loads(out.read_text())["results"]
    assert row["config"]["attn"] == "math" and row["img_per_s"] > 0 and row["mfu_measured"] > 0
