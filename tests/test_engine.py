"""The shared loop on its own: a stub loader, a tiny model, no entry point."""

import json

import pytest
import torch
from torch import nn

from mae.tasks import load_config
from mae.train.engine import Task, train
from mae.train.optim import lr_at, param_groups
from mae.train.runtime import make_accelerator


class StubLoader:
    """4 steps per epoch; the batch of step 2 of every epoch arrived with all its samples corrupt."""

    num_samples, steps_per_epoch, num_classes = 32, 4, 2

    def iterate(self, epoch, start_step=0):
        g = torch.Generator().manual_seed(epoch)
        for i in range(self.steps_per_epoch):
            x = torch.randn(8, 3, generator=g)
            y = (x[:, 0] > 0).long()
            if i < start_step:
                continue
            yield (x[:0], y[:0], 8) if i == 2 else (x, y, 0)


def stub_config(out, *overrides):
    """8 fp32 steps of 8 samples on the stub loader, a log row every 4 steps, no warmup."""
    return load_config(
        [
            f"output_dir={out}",
            "train.max_steps=8",
            "train.precision=fp32",
            "train.batch_size=8",
            "log.every_steps=4",
            "train.warmup_epochs=0",
            *overrides,
        ]
    )


def test_all_corrupt_batch_is_counted_and_the_run_goes_on(tmp_path):
    cfg = stub_config(tmp_path, "checkpoint.every_steps=100")
    model = nn.Sequential(nn.Linear(3, 2))
    seen = []

    def loss_fn(m, x, y, step, micro):
        seen.append(x.shape[0])
        return nn.functional.cross_entropy(m(x), y)

    acc = make_accelerator(cfg)
    task = Task(model=model, groups=param_groups(model, 0.0), loader=StubLoader(), loss_fn=loss_fn)
    assert train(cfg, acc, task) == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8]
    assert rows[-1]["bad_samples"] == 16
    assert seen.count(2) == 2 and seen.count(8) == 6  # the empty batches ran as zero-weight passes


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1.0) == 0.0
    assert lr_at(5, 100, 10, 1.0) == 0.5
    assert lr_at(10, 100, 10, 1.0) == 1.0
    assert abs(lr_at(55, 100, 10, 1.0, 0.1) - 0.55) < 1e-9  # half-way down the cosine
    assert abs(lr_at(100, 100, 10, 1.0, 0.1) - 0.1) < 1e-9


def reference_pretrain_decay(model: nn.Module) -> tuple[set, set]:
    """The reference pretraining's groups (main_pretrain.py -> timm's add_weight_decay, no skip list),
    transcribed: trainable parameters are decayed unless 1-d or a bias."""
    decay, no_decay = set(), set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if len(p.shape) == 1 or name.endswith(".bias") else decay).add(name)
    return decay, no_decay


def test_pretraining_decays_exactly_what_the_reference_decays():
    """Tokens are decayed in pretraining (as the reference); biases and norms are not; the fixed sin-cos
    tables are not trained at all."""
    from mae.models import create_mae

    model = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=1, decoder_depth=1)
    groups = param_groups(model, 0.05)
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    decay = {n for g in groups if g["weight_decay"] == 0.05 for n in g["names"]}
    assert (decay, no_decay) == reference_pretrain_decay(model)
    assert {"cls_token", "mask_token"} <= decay and "blocks.0.norm1.weight" in no_decay
    assert "pos_embed" not in no_decay | decay and "decoder_pos_embed" not in no_decay | decay


def test_img_per_s_leaves_out_warm_up_monitor_and_checkpoint_time(tmp_path):
    """The first step (torch.compile's warm-up) and the monitor / evaluation / checkpoint pauses are not
    training: a 1 s stall in each must not show in img/s (steps of a linear layer take milliseconds)."""
    import time

    cfg = stub_config(tmp_path, "checkpoint.every_steps=2")
    model = nn.Sequential(nn.Linear(3, 2))
    calls = []

    def loss_fn(m, x, y, step, micro):
        calls.append(step)
        if len(calls) == 1:
            time.sleep(1.0)  # the first step compiles
        return nn.functional.cross_entropy(m(x), y)

    def monitor(m, step):
        time.sleep(1.0)
        return {"probe": 1.0}

    acc = make_accelerator(cfg)
    task = Task(
        model=model,
        groups=param_groups(model, 0.0),
        loader=StubLoader(),
        loss_fn=loss_fn,
        monitor=monitor,
        monitor_every=2,
    )
    t = time.time()
    assert train(cfg, acc, task) == 0
    wall = time.time() - t
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "img_per_s" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8]  # monitor steps log too
    assert wall > 5.0  # the stalls happened: 1 warm-up + 4 monitor calls
    # counted, the stalls would cap each window at 2 steps x 8 images / 1 s = 16 img/s
    assert all(r["img_per_s"] > 100 for r in logged), logged


def test_eta_follows_the_recent_pace_after_a_suspension(monkeypatch):
    """A job suspended for an hour (SIGSTOP, a preempted node, a laptop lid) then running at its old pace:
    the ETA returns to the remaining steps at that pace instead of carrying the hour for the rest of the run."""
    from mae.train import meter

    clock = [0.0]
    monkeypatch.setattr(meter.time, "perf_counter", lambda: clock[0])
    m = meter.Meter(total_steps=10_000, start_step=0, images_per_step=8, eta_windows=50)
    step = 0

    def window(seconds_per_step: float = 1.0):
        nonlocal step
        for _ in range(10):
            step += 1
            clock[0] += seconds_per_step
            m.step_done(step)
        return m.read(step)

    for _ in range(60):
        r = window()
    assert r.eta_s == pytest.approx(10_000 - step)
    clock[0] += 3600.0  # suspended
    r = window()
    assert r.eta_s > 5 * (10_000 - step)  # the hour is in the recent windows: the estimate says so
    for _ in range(50):
        r = window()
    assert r.eta_s == pytest.approx(10_000 - step)
    for _ in range(50):
        r = window(seconds_per_step=0.5)  # the neighbour left: twice as fast
    assert r.eta_s == pytest.approx(0.5 * (10_000 - step))


class SlowLoader(StubLoader):
    """The stub's batches, each arriving `delay` seconds after it is asked for."""

    def __init__(self, delay: float):
        self.delay = delay

    def iterate(self, epoch, start_step=0):
        import time

        for batch in super().iterate(epoch, start_step):
            time.sleep(self.delay)
            yield batch


def test_data_wait_is_the_fraction_of_the_window_spent_waiting_for_batches(tmp_path):
    """Every logged row carries data_wait; a loader much slower than the step shows up as most of the time."""
    rates = {}
    for delay in (0.0, 0.3):
        out = tmp_path / f"delay{delay}"
        cfg = stub_config(out, "checkpoint.every_steps=100", "log.every_steps=2")
        model = nn.Sequential(nn.Linear(3, 2))
        task = Task(model=model, groups=param_groups(model, 0.0), loader=SlowLoader(delay),
                    loss_fn=lambda m, x, y, step, micro: nn.functional.cross_entropy(m(x), y) if len(x) else m(x).sum())  # fmt: skip
        assert train(cfg, make_accelerator(cfg), task) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [2, 4, 6, 8] and all(0.0 <= r["data_wait"] <= 1.0 for r in rows)
        rates[delay] = rows
    assert all(r["data_wait"] > 0.6 for r in rates[0.3]), rates[0.3]  # a step takes tens of ms, a batch 300
    assert min(r["data_wait"] for r in rates[0.0]) < min(r["data_wait"] for r in rates[0.3])


def test_a_starved_step_gets_one_line_of_loader_advice(tmp_path, capsys, monkeypatch):
    """A GPU fed by the demo's one worker waits for data most of the time: the log says so once, with the
    setting to raise, when the process has cores no worker uses; never when the cores are all taken."""
    from mae.train import engine
    from mae.train.meter import loader_hint

    hint = loader_hint(0.6, 1, 16)
    assert "data_wait 60% with data.num_workers=1 and 16 CPU cores" in hint and hint.endswith(
        "data.num_workers=8"
    )
    assert loader_hint(0.6, 10, 16).endswith("data.num_workers=15")
    assert loader_hint(0.1, 1, 16) is None  # the step is the bottleneck
    assert loader_hint(0.9, 1, 2) is None and loader_hint(0.9, 15, 16) is None  # no idle core to give

    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = stub_config(tmp_path, "checkpoint.every_steps=100", "log.every_steps=2", "data.num_workers=1")
    model = nn.Sequential(nn.Linear(3, 2))
    task = Task(model=model, groups=param_groups(model, 0.0), loader=SlowLoader(0.3),
                loss_fn=lambda m, x, y, step, micro: nn.functional.cross_entropy(m(x), y) if len(x) else m(x).sum())  # fmt: skip
    assert train(cfg, make_accelerator(cfg), task) == 0
    out = capsys.readouterr().out
    assert out.count("the input pipeline is the bottleneck") == 1, out
    assert "with data.num_workers=1 and 16 CPU cores for this process; try data.num_workers=8" in out


def _run_recording_model(tmp_path, capsys, compile_value):
    cfg = stub_config(
        tmp_path, f"train.compile={compile_value}", "train.max_steps=2", "checkpoint.every_steps=100"
    )
    model = nn.Sequential(nn.Linear(3, 2))
    seen = []

    def loss_fn(m, x, y, step, micro):
        seen.append(m)
        return nn.functional.cross_entropy(m(x), y)

    task = Task(model=model, groups=param_groups(model, 0.0), loader=StubLoader(), loss_fn=loss_fn)
    assert train(cfg, make_accelerator(cfg), task) == 0
    return seen, capsys.readouterr().out


def test_compile_auto_stays_eager_on_the_cpu(tmp_path, capsys):
    seen, out = _run_recording_model(tmp_path, capsys, "auto")
    assert not any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in seen)
    assert "torch.compile" not in out


@pytest.mark.slow
def test_compile_true_compiles_and_logs_the_first_step_once(tmp_path, capsys):
    seen, out = _run_recording_model(tmp_path, capsys, "true")
    assert all(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in seen)
    assert out.count("torch.compile: mode default (train.compile=true)") == 1
    assert out.count("torch.compile: first step took") == 1, out


def test_the_start_line_says_why_the_cpu_runs_bf16_or_fp32(monkeypatch):
    from mae.train import runtime

    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    assert runtime.resolve_precision("auto", on_cuda=False) == "bf16"
    assert "avx512_bf16/AMX, bf16 autocast runs natively" in runtime.precision_reason("auto", "cpu")
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    assert runtime.resolve_precision("auto", on_cuda=False) == "fp32"
    assert "no avx512_bf16 or AMX" in runtime.precision_reason("auto", "cpu")
    assert runtime.precision_reason("bf16", "cpu") == "" and runtime.precision_reason("auto", "cuda") == ""


def test_pace_reads_the_steps_since_the_warm_up_without_closing_the_window():
    from mae.train.meter import Meter

    m = Meter(total_steps=10, start_step=0, images_per_step=4)
    assert m.pace(0) is None
    m.step_done(1)  # warm-up
    assert m.pace(1) is None
    for s in (2, 3):
        m.step_done(s)
    per_step, eta = m.pace(3)
    assert per_step >= 0 and eta == pytest.approx(per_step * 7)
    assert m.steps == 2  # the log window still counts both steps
