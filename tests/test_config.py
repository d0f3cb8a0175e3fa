import re

import pytest
import yaml

from mae.config import RECIPES_DIR, ConfigError, derive
from mae.tasks import load_config


def test_merge_order_base_recipe_cli():
    base = load_config([])
    assert base.train.blr == pytest.approx(1.5e-4) and base.model.in_chans == 3
    demo = load_config(["recipe=demo"])
    assert demo.model.in_chans == 1 and demo.data.train == "fashion-mnist"
    assert demo.train.weight_decay == base.train.weight_decay  # untouched keys come from base.yaml
    cli = load_config(["recipe=demo", "model.in_chans=3", "train.betas=[0.8,0.9]", "data.mean=[0.5,0.5,0.5]"])
    assert cli.model.in_chans == 3 and list(cli.train.betas) == [0.8, 0.9]
    assert cli.output_dir == "runs/demo"


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'train.bach_size'.*train.batch_size"):
        load_config(["train.bach_size=4"])
    with pytest.raises(ConfigError, match="unknown key 'nonsense'"):
        load_config(["nonsense=1"])


@pytest.mark.parametrize(
    "arg,key",
    [
        ("train.batch_size=abc", "train.batch_size"),
        ("train.batch_size=1.5", "train.batch_size"),
        ("train.compile=3", "train.compile"),
        ("train.betas=0.9", "train.betas"),
        ("train.blr=fast", "train.blr"),
    ],
)
def test_wrong_type_is_rejected(arg, key):
    with pytest.raises(ConfigError, match=key):
        load_config([arg])


def test_ints_are_accepted_for_floats_and_argument_shape_checked():
    assert load_config(["train.blr=1"]).train.blr == 1.0
    with pytest.raises(ConfigError, match="key=value"):
        load_config(["train.blr"])
    with pytest.raises(ConfigError, match="recipe 'nope' not found"):
        load_config(["recipe=nope"])


def test_every_recipe_is_a_valid_delta_of_base():
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        if path.stem != "base":
            cfg = load_config([f"recipe={path.stem}"])
            assert cfg.recipe == path.stem


def test_base_yaml_comments_every_key():
    lines = (RECIPES_DIR / "base.yaml").read_text().splitlines()
    for line in lines:
        s = line.strip()
        if s and not s.startswith("#") and not s.endswith(":"):
            assert "#" in s, f"base.yaml key without a comment: {s}"


def test_derive_lr_and_steps():
    cfg = load_config(
        ["train.batch_size=64", "train.grad_accum=2", "train.epochs=3", "train.warmup_epochs=1"]
    )
    d = derive(cfg, world_size=4, loader_steps_per_epoch=100)
    assert d.effective_batch == 512
    assert d.lr == pytest.approx(1.5e-4 * 512 / 256)
    assert d.steps_per_epoch == 50 and d.total_steps == 150 and d.warmup_steps == 50
    assert derive(load_config(["train.max_steps=7"]), 1, 10).total_steps == 7
    with pytest.raises(ConfigError, match="larger than one epoch"):
        derive(load_config(["train.grad_accum=4"]), 1, 3)


def test_reference_recipes_match_the_paper():
    for name in ("vit_base", "vit_large", "vit_huge"):
        cfg = load_config([f"recipe={name}"])
        raw = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
        assert (
            raw["train"]["batch_size"]
            * raw["train"]["grad_accum"]
            * {"vit_base": 32, "vit_large": 64, "vit_huge": 128}[name]
            == 4096
        )
        assert cfg.model.mask_ratio == 0.75 and cfg.model.norm_pix_loss
        assert cfg.train.blr == pytest.approx(1.5e-4) and cfg.train.weight_decay == 0.05
        assert list(cfg.train.betas) == [0.9, 0.95]
        assert cfg.train.epochs == 800 and cfg.train.warmup_epochs == 40 and cfg.data.scale_min == 0.2


def test_exponent_without_a_dot_is_a_number():
    assert load_config(["train.blr=4e-3"]).train.blr == pytest.approx(4e-3)


def test_compile_choices_and_what_auto_means(monkeypatch):
    from mae import config

    with pytest.raises(ConfigError, match="train.compile='fast' is not one of auto, true, false"):
        load_config(["train.compile=fast"])
    assert load_config([]).train.compile == "auto"
    assert load_config(["train.compile=true"]).train.compile == "true"  # YAML's boolean, kept as the word
    assert config.resolve_compile("auto", "cpu")[0] is None
    assert config.resolve_compile("true", "cpu")[0] == "default"
    assert config.resolve_compile("false", "cuda")[0] is None
    assert config.resolve_compile("max-autotune-no-cudagraphs", "cuda")[0] == "max-autotune-no-cudagraphs"
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: object())
    assert config.resolve_compile("auto", "cuda") == ("default", "train.compile=auto on cuda")
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None)
    assert config.resolve_compile("auto", "cuda") == (None, "train.compile=auto: Triton is not installed")


def _base_keys() -> dict:
    from mae.config import _flatten, load_yaml

    return _flatten(load_yaml(RECIPES_DIR / "base.yaml"))


@pytest.mark.parametrize("task", ["pretrain", "finetune", "linprobe", "segment"])
def test_every_base_key_is_read_or_refused_by_each_entry_point(task):
    """Walks recipes/base.yaml: a key added later is either in READS of an entry point or refused by it."""
    import json

    from mae.tasks import READS

    needs = {"model.pos_embed_adapt": ["model.init=runs/x"]}  # read only when there is a model.init
    for key, default in _base_keys().items():
        arg = f"{key}={json.dumps(default) if not isinstance(default, str) else default}"
        if key in READS[task]:
            if key not in ("train.betas", "train.eval_stride"):  # eval_stride: unused under eval_mode=whole
                load_config([arg, *needs.get(key, [])], task=task)
            continue
        with pytest.raises(ConfigError, match=rf"{re.escape(key)} is not read by {task} \(read by: "):
            load_config([arg], task=task)


def test_every_base_key_has_a_reader_and_every_reader_key_exists():
    from mae.tasks import READS

    keys = set(_base_keys())
    assert all(any(k in r for r in READS.values()) for k in keys)
    assert set().union(*READS.values()) <= keys


def test_recipe_keys_are_checked_against_the_task_and_synthetic_gets_a_note():
    with pytest.raises(ConfigError, match=r"recipe demo.yaml: model.norm_pix_loss is not read by finetune"):
        load_config(["recipe=demo"], task="finetune")
    with pytest.raises(ConfigError, match="train.betas is not read with train.optimizer=lars"):
        load_config(["recipe=linprobe_demo", "train.betas=[0.9,0.99]"], task="linprobe")
    notes = []
    load_config(["data.train=synthetic", "data.hflip=false"], task="pretrain", log=notes.append)
    assert len(notes) == 1 and "data.hflip" in notes[0]
    notes.clear()
    load_config(["recipe=demo"], task="pretrain", log=notes.append)  # fashion-mnist: crops and flips apply
    assert notes == []
