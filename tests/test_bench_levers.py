"""The levers the GPU check measures, as mae-bench options: fused AdamW with capturable state, the loss outside
the compiled graph, the masking noise drawn as the training loop draws it, a profile of the first configuration;
and train.compile=reduce-overhead (CUDA graphs) accepted by the training loop's configuration."""

import json

import pytest
import torch

from mae.bench import main
from mae.config import resolve_compile
from mae.models import create_mae
from mae.perf.step import PredictOnly, make_step
from mae.perf.step import bench_optimizer as build_optimizer
from mae.tasks import load_config

TINY = ["--model", "mae_vit_tiny_patch16", "--img-size", "32", "--matmul-size", "128", "--steps", "1",
        "--warmup", "0", "--dtype", "fp32", "--batch", "2"]  # fmt: skip


def _tiny():
    torch.manual_seed(0)
    return create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, norm_pix_loss=True)


def test_fused_capturable_is_the_fused_kernel_with_capturable_state_and_the_loops_groups():
    opt = build_optimizer(_tiny(), "fused-capturable")
    assert opt.defaults["fused"] and opt.defaults["capturable"]
    assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 0.05]
    p = opt.param_groups[0]["params"][0]
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(p, before) and torch.is_tensor(opt.state[p]["step"])


def test_loss_outside_the_model_is_the_models_loss_with_the_same_gradients():
    graph, eager = _tiny(), _tiny()
    images = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, graph.patch_embed.num_patches)
    loss, _, _ = graph(images, mask_ratio=0.75, noise=noise)
    pred, mask = PredictOnly(eager)(images, 0.75, noise)
    outside = eager.forward_loss(images, pred, mask)
    assert torch.equal(loss, outside)
    loss.backward()
    outside.backward()
    for (name, a), b in zip(graph.named_parameters(), eager.parameters()):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("source", ["device", "host"])
def test_the_step_feeds_the_masking_noise_to_the_model_as_the_loop_does(source):
    model = _tiny()
    seen = []
    forward = model.forward

    def spy(imgs, mask_ratio=0.75, noise=None):
        seen.append(noise)
        return forward(imgs, mask_ratio=mask_ratio, noise=noise)

    model.forward = spy
    opt = build_optimizer(model, "forloop")
    step = make_step(model, opt, torch.device("cpu"), "fp32", 0.75, num_patches=16, noise=source)
    images = torch.randn(2, 3, 32, 32)
    step(images)
    step(images)
    assert all(n.shape == (2, 16) and n.dtype == torch.float32 and 0 <= n.min() and n.max() < 1 for n in seen)
    assert not torch.equal(seen[0], seen[1])  # a new mask every step


def test_step_with_the_loss_outside_trains_as_the_step_with_the_loss_inside():
    a, b = _tiny(), _tiny()
    images = torch.randn(2, 3, 32, 32)
    losses = []
    for model, loss_fn in ((a, None), (b, b.forward_loss)):
        runner = model if loss_fn is None else PredictOnly(model)
        step = make_step(runner, build_optimizer(model, "forloop"), torch.device("cpu"), "fp32", 0.75,
                         num_patches=16, loss_fn=loss_fn)  # fmt: skip
        torch.manual_seed(1)
        losses.append([float(step(images)) for _ in range(2)])
    assert losses[0] == losses[1]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_cli_measures_the_levers_side_by_side_and_profiles_the_first(tmp_path):
    out, prof = tmp_path / "levers.json", tmp_path / "profile.txt"
    rc = main([*TINY, "--json", str(out), "--profile", str(prof), "--config", "optimizer=fused",
               "--config", "optimizer=fused-capturable", "--config", "loss=eager", "--config", "noise=host"])  # fmt: skip
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    got = [(r["config"]["optimizer"], r["config"]["loss"], r["config"]["noise"]) for r in rows]
    assert got == [("fused", "graph", "device"), ("fused-capturable", "graph", "device"),
                   ("fused", "eager", "device"), ("fused", "graph", "host")]  # fmt: skip
    assert all(not r["error"] and r["img_per_s"] > 0 for r in rows)
    text = prof.read_text()
    assert "aten::mm" in text and "3 steps under torch.profiler" in text
    assert "fp32 sdpa compile off fused b2" in text.splitlines()[0]  # the first configuration's


@pytest.mark.parametrize(
    "argv, message",
    [(["--loss", "inside"], "--loss 'inside'"), (["--noise", "cpu"], "--noise 'cpu'"),
     (["--config", "noise=gpu"], "unknown noise 'gpu'"), (["--optimizer", "capturable"], "--optimizer 'capturable'")],
)  # fmt: skip
def test_bad_lever_values_are_one_line(argv, message, capsys):
    assert main([*TINY, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_train_compile_takes_the_cuda_graphs_mode():
    assert load_config(["train.compile=reduce-overhead"]).train.compile == "reduce-overhead"
    assert resolve_compile("reduce-overhead", "cuda")[0] == "reduce-overhead"
    assert load_config(["recipe=vit_large"]).train.compile == "auto"  # the recipes' default is unchanged
