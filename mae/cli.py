"""What every entry point answers besides training: `--help` (usage, recipes, the keys used most) and
`--print-config` (the resolved configuration and the derived values, nothing trained or written).

`--help` reads only recipes/*.yaml, so it answers before torch is imported.
"""

from __future__ import annotations

import os
import re
import sys

from mae.config import READS, RECIPES_DIR, ConfigError, task_of_recipe

HELP_FLAGS = ("-h", "--help")
PRINT_CONFIG = "--print-config"

# The keys a user reaches for first, in this order (every key: recipes/base.yaml); some only for some tasks.
KEYS = ("output_dir", "data.train", "data.val", "model.init", "train.epochs", "train.max_steps", "train.batch_size",
        "train.grad_accum", "train.blr", "train.precision", "train.eval_every", "train.layer_decay", "model.name",
        "model.img_size", "model.patch_size", "model.in_chans", "model.mask_ratio", "model.drop_path",
        "checkpoint.every_steps", "log.every_steps", "log.knn_every_steps", "log.wandb", "log.tensorboard")  # fmt: skip


def recipe_summaries(task: str) -> list[tuple[str, str]]:
    """(name, first comment line) of each recipe for `task` (finetune_*, linprobe_*, the rest pretrain)."""
    out = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        name = path.stem
        if name == "base" or task_of_recipe(name) != task:
            continue
        first = next((line for line in path.read_text().splitlines() if line.strip()), "")
        what = first.lstrip("# ").strip() if first.lstrip().startswith("#") else ""
        out.append((name, _one_line(what)))
    return out


def _one_line(text: str) -> str:
    """A first comment line as a phrase: a parenthesis that the line leaves open is cut off."""
    depth, cut = 0, len(text)
    for i, ch in enumerate(text):
        if ch == "(":
            depth, cut = depth + 1, i if depth == 0 else cut
        elif ch == ")" and depth:
            depth, cut = depth - 1, len(text) if depth == 1 else cut
    return text[:cut].rstrip(" ,:;")


def key_docs() -> dict[str, tuple[str, str]]:
    """{dotted key: (default as written, its comment)} read from recipes/base.yaml (a comment continued on
    the next lines is joined)."""
    docs, section, last = {}, "", None
    for line in (RECIPES_DIR / "base.yaml").read_text().splitlines():
        if last and re.match(r"^\s+#", line):
            docs[last] = (docs[last][0], docs[last][1] + " " + line.strip().lstrip("# "))
            continue
        m = re.match(r"^(\s*)([A-Za-z_]\w*):\s*(.*)$", line)
        last = None
        if not m:
            continue
        indent, key, rest = m.groups()
        value, _, comment = rest.partition("#")
        if not indent and not value.strip() and not comment:
            section = key + "."
            continue
        last = (section if indent else "") + key
        docs[last] = (value.strip(), comment.strip())
    return docs


def usage(task: str, doc: str | None = None) -> str:
    script = f"mae/{task}.py"
    lines = [
        f"usage: python {script} [recipe=NAME] [key=value ...]",
        f"       accelerate launch [--multi_gpu --num_processes N ...] {script} [recipe=NAME] [key=value ...]",
        f"       python {script} recipe=NAME [key=value ...] --print-config",
        "",
    ]
    if doc:
        paragraphs = doc.strip().split("\n\n")
        examples = [line.strip() for line in doc.splitlines() if line.startswith("    ")]
        lines += [paragraphs[0], ""]
        if examples:
            lines += ["examples:", *(f"  {e}" for e in examples), ""]
    lines += [
        "Configuration: recipes/base.yaml <- recipes/NAME.yaml <- key=value on the command line (last wins);",
        "a key that base.yaml does not define, or a value of another type, is an error. The same command in the",
        "same output_dir resumes.",
        "",
        "recipes:",
    ]
    recipes = recipe_summaries(task)
    width = max((len(n) for n, _ in recipes), default=0)
    lines += [f"  {name:<{width}}  {what}" for name, what in recipes] or ["  (none)"]
    docs = key_docs()
    reads = READS[task]
    keys = [k for k in KEYS if k in docs and k in reads]
    defaults = {k: docs[k][0] or '""' for k in keys}
    kw, dw = max(map(len, keys)), max(map(len, defaults.values()))
    lines += ["", "keys used most (default, meaning):"]
    lines += [f"  {k:<{kw}}  {defaults[k]:<{dw}}  {docs[k][1]}" for k in keys]
    others = [k for k in docs if k in reads and k not in keys]
    lines += ["", f"the other keys {task} reads (any other key is refused):"]
    lines += _wrap(others, "  ")
    lines += [
        "",
        f"every key, with its default and a comment: {RECIPES_DIR / 'base.yaml'}",
        "",
        "options:",
        "  -h, --help        print this and exit",
        "  --print-config    print the resolved configuration and the derived values (effective batch, lr,",
        "                    steps per epoch, total and warmup steps), then exit: nothing is trained or written",
    ]
    return "\n".join(lines)


def _wrap(words: list[str], indent: str, width: int = 110) -> list[str]:
    lines, line = [], indent
    for w in words:
        if len(line) + len(w) + 1 > width and line.strip():
            lines.append(line.rstrip())
            line = indent
        line += w + " "
    return [*lines, line.rstrip()] if line.strip() else lines


def split_flags(argv: list[str]) -> tuple[list[str], set[str]]:
    """(key=value arguments, flags); an unknown `--flag` is a ConfigError."""
    args, flags = [], set()
    for a in argv:
        if a in (*HELP_FLAGS, PRINT_CONFIG):
            flags.add("help" if a in HELP_FLAGS else "print-config")
        elif a.startswith("-") and "=" not in a:
            raise ConfigError(f"unknown option '{a}' (options: --help, --print-config; settings: key=value)")
        else:
            args.append(a)
    return args, flags


def exit_if_help(task: str, doc: str | None, argv: list[str]) -> None:
    """For `python mae/<task>.py --help`: answer before the entry point imports torch."""
    if any(a in HELP_FLAGS for a in argv):
        print(usage(task, doc))
        sys.exit(0)


def is_main_rank() -> bool:
    """Rank 0 of a launch (read from the launcher's environment: no process group is needed)."""
    return os.environ.get("RANK", "0") == "0"


def print_config(cfg, steps_per_epoch=None) -> int:
    """The resolved config plus the derived values of a launch on WORLD_SIZE processes. The steps need the
    size of data.train: the loader's own count (manifest, folder listing, built-in size), no image is read;
    `steps_per_epoch(cfg, world_size)` counts them for a task that reads other data."""
    from mae.build import model_overrides
    from mae.config import derive, to_yaml
    from mae.data import build_train_loader

    model_overrides(cfg)  # the model's own one-line errors (image vs patch size, channels)
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if steps_per_epoch is not None:
        if is_main_rank():
            print(to_yaml(cfg, derive(cfg, world_size, steps_per_epoch(cfg, world_size))), end="")
        return 0
    if cfg.task == "segment":  # image / mask pairs
        from mae.data.segmentation import SegTrainLoader, pair_source

        d = cfg.data
        src = pair_source(d.train, train=True, reduce_zero_label=d.reduce_zero_label, fmnist_dir=d.fmnist_dir)
        spe = SegTrainLoader(src, None, in_chans=cfg.model.in_chans, num_classes=0, batch_size=cfg.train.batch_size,
                             seed=cfg.seed, rank=0, world_size=world_size, workers=0,
                             epoch_samples=d.epoch_samples).steps_per_epoch  # fmt: skip
        if is_main_rank():
            print(to_yaml(cfg, derive(cfg, world_size, spe)), end="")
        return 0
    loader = build_train_loader(
        cfg.data,
        source=cfg.data.train,
        img_size=cfg.model.img_size,
        in_chans=cfg.model.in_chans,
        batch_size=cfg.train.batch_size,
        augment="none",
        seed=cfg.seed,
        rank=0,
        world_size=world_size,
    )
    derived = derive(cfg, world_size, loader.steps_per_epoch)
    if is_main_rank():
        print(to_yaml(cfg, derived), end="")
    return 0
