"""What a first command gets: --help, --print-config, and train/val pairs that cannot be scored together."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mae import detect, finetune, linprobe, pretrain, segment
from mae.cli import key_docs
from mae.config import RECIPES_DIR

ROOT = Path(__file__).resolve().parents[1]
MAINS = {
    "pretrain": pretrain.main,
    "finetune": finetune.main,
    "linprobe": linprobe.main,
    "segment": segment.main,
    "detect": detect.main,
}


def first_comment(recipe: str) -> str:
    return (RECIPES_DIR / f"{recipe}.yaml").read_text().splitlines()[0].lstrip("# ")


def help_in_a_fresh_process(run: str, argv0: str, flag: str = "--help") -> subprocess.CompletedProcess:
    """`run` (a runpy call) with sys.argv [argv0, flag] in a new interpreter; its output ends with
    'exit CODE TORCH_IMPORTED'."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['{argv0}', '{flag}']\n"
        f"try:\n    {run}\n"
        "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_of_the_script_answers_without_importing_torch(flag):
    r = help_in_a_fresh_process(
        "runpy.run_path('mae/pretrain.py', run_name='__main__')", "mae/pretrain.py", flag
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("exit 0 False")
    out = r.stdout
    assert out.startswith("usage: python mae/pretrain.py [recipe=NAME] [key=value ...]")
    assert first_comment("demo")[:60] in out and "vit_large" in out and "finetune_demo" not in out
    assert "data.train" in out and "train.max_steps" in out and "log.tensorboard" in out
    assert str(RECIPES_DIR / "base.yaml") in out and "--print-config" in out


@pytest.mark.parametrize("task", ["pretrain", "finetune", "linprobe", "segment", "detect"])
def test_help_of_every_entry_point_lists_its_own_recipes(task, capsys):
    assert MAINS[task](["--help"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.split("recipes:\n")[1].split("\n\n")[0].splitlines()]
    stems = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem != "base")
    if task == "pretrain":
        expected = [n for n in stems if not n.startswith(("finetune_", "linprobe_", "segment_", "detect_"))]
    else:
        expected = [n for n in stems if n.startswith(task + "_")]
    assert listed == expected and all(first_comment(n)[:40] in out for n in expected)
    assert f"usage: python mae/{task}.py" in out
    # every key the entry point reads is shown, and none that it refuses
    from mae.tasks import READS

    shown = set(re.findall(r"\b((?:model|data|train|checkpoint|log)\.\w+)", out.split("recipes:\n")[1]))
    base_keys = {k for k in key_docs() if "." in k}
    assert shown & base_keys == READS[task] & base_keys
    assert "model.init" in out and ("log.knn_every_steps" in out) == (task == "pretrain")


def test_help_as_a_module():
    r = subprocess.run(
        [sys.executable, "-m", "mae.linprobe", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "linprobe_vit_base" in r.stdout and r.stderr == ""


def test_print_config_derives_the_schedule_and_writes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = [
        "data.train=synthetic",
        "data.synthetic_samples=1000",
        "train.batch_size=50",
        "train.grad_accum=2",
        "train.epochs=3",
        "train.warmup_epochs=0.5",
        f"output_dir={out}",
        "--print-config",
    ]
    assert pretrain.main(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["batch_size"] == 50 and printed["output_dir"] == str(out)
    d = printed["derived"]
    assert (d["effective_batch"], d["steps_per_epoch"], d["total_steps"], d["warmup_steps"]) == (
        100,
        10,
        30,
        5,
    )
    assert d["lr"] == pytest.approx(1.5e-4 * 100 / 256)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as `accelerate launch --num_processes 2` sets it
    assert pretrain.main(args) == 0
    d = yaml.safe_load(capsys.readouterr().out)["derived"]
    assert (d["world_size"], d["effective_batch"], d["steps_per_epoch"]) == (2, 200, 5)
    assert not out.exists()


def test_an_unknown_option_is_one_line_and_exit_2(capsys):
    assert pretrain.main(["--epochs", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--epochs" in err[0] and "--help" in err[0]


# ----------------------------------------------------------------------------- train/val pairs


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A labelled folder of 10 classes ('0'..'9'), 4 images each."""
    root = tmp_path_factory.mktemp("digits")
    for c in range(10):
        (root / str(c)).mkdir()
        for i in range(4):
            Image.new("L", (28, 28), color=20 * c + i).save(root / str(c) / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "task,recipe", [("pretrain", "demo"), ("finetune", "finetune_demo"), ("linprobe", "linprobe_demo")]
)
def test_other_classes_in_data_val_are_an_error_before_anything_is_written(
    tmp_path, capsys, digits, task, recipe
):
    out = tmp_path / "run"
    args = [f"recipe={recipe}", f"data.train={digits}", "data.val=fashion-mnist:test", f"output_dir={out}"]
    assert MAINS[task](args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other classes" in err[0] and "'T-shirt/top'" in err[0] and "'0', '1'" in err[0]
    assert not out.exists()


def test_the_issue_command_exits_2_at_once(tmp_path, digits):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "mae/pretrain.py",
        "recipe=demo",
        f"data.train={digits}",
        "data.val=fashion-mnist:test",
    ]
    r = subprocess.run([*cmd, f"output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: data.val=")
    assert not out.exists()


def test_same_names_different_meaning_is_a_mismatch(tmp_path):
    """Synthetic and Fashion-MNIST both have 10 classes: the names tell them apart."""
    assert pretrain.main(["recipe=demo", "data.train=synthetic", "data.val=fashion-mnist:test"]) == 2


@pytest.mark.parametrize("task,recipe", [("pretrain", "demo"), ("finetune", "finetune_demo")])
def test_the_recipes_data_val_is_dropped_when_only_data_train_is_given(
    tmp_path, capsys, digits, task, recipe
):
    args = [f"recipe={recipe}", f"data.train={digits}", "train.batch_size=8", "--print-config"]
    assert MAINS[task](args) == 0
    out = capsys.readouterr().out
    note, printed = out.split("\n", 1)
    assert note.startswith("note: data.val='fashion-mnist:test'") and "dropped" in note
    cfg = yaml.safe_load(printed)
    assert cfg["data"]["val"] == "" and cfg["log"]["knn_every_steps"] == 0


def test_asking_for_the_monitor_keeps_the_error(capsys, digits):
    args = [
        "recipe=demo",
        f"data.train={digits}",
        "log.knn_every_steps=10",
        "train.batch_size=8",
        "--print-config",
    ]
    assert pretrain.main(args) == 2


def test_held_out_images_of_the_same_classes_pass(capsys, digits):
    args = [
        "recipe=demo",
        f"data.train={digits}",
        f"data.val={digits}",
        "train.batch_size=8",
        "--print-config",
    ]
    assert pretrain.main(args) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["data"]["val"] == str(digits) and cfg["log"]["knn_every_steps"] == 78


def test_an_error_while_building_the_run_gives_the_callers_signal_handlers_back(tmp_path, capsys):
    """The stop handlers are installed before the model and data are built; when building fails (here a
    data path that does not exist), the process, a notebook or a test runner, gets its own handlers back."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    args = [
        "recipe=demo",
        f"data.train={tmp_path / 'missing'}",
        "data.val=",
        f"output_dir={tmp_path / 'run'}",
    ]
    assert pretrain.main(args) == 2
    assert "missing" in capsys.readouterr().err
    assert {s: signal.getsignal(s) for s in before} == before


def _commands() -> list[str]:
    """Every command: the console scripts pyproject.toml installs (as their modules), and the data tools'
    benchmark the docs run as a module."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return sorted({entry.split(":")[0] for entry in scripts.values()} | {"data_tools.bench"})


@pytest.mark.parametrize("module", _commands())
def test_help_of_every_command_answers_before_torch_is_imported(module):
    """`mae-embed --help` once took 3-4 s: torch was imported before the arguments were parsed."""
    r = help_in_a_fresh_process(f"runpy.run_module('{module}', run_name='__main__')", module)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and r.stdout.strip().endswith("exit 0 False"), r.stdout[-500:]
