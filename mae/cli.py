"""What every training command shares: `--help` (usage, recipes, the keys used most), `--print-config` (the
resolved configuration and the derived values, nothing trained or written), and running a task on the engine
with its errors turned into exit codes (`run_task`); and what every command shares, its way out on Ctrl-C and
SIGTERM (`exit_with`).

`--help` reads only recipes/*.yaml and the task's declared keys, so it answers before torch is imported.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from mae.config import RECIPES_DIR, ConfigError, task_of_recipe
from mae.tasks import READS, TASKS, task_module

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
        if name == "base" or task_of_recipe(name, TASKS) != task:
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


def is_main_rank() -> bool:
    """Rank 0 of a launch (read from the launcher's environment: no process group is needed)."""
    return os.environ.get("RANK", "0") == "0"


def print_config(cfg) -> int:
    """The resolved config plus the derived values of a launch on WORLD_SIZE processes. The steps need the
    size of data.train: the task's loader's own count (manifest, folder listing, built-in size), no image is
    read."""
    from mae.config import derive, to_yaml
    from mae.weights.build import model_overrides

    model_overrides(cfg)  # the model's own one-line errors (image vs patch size, channels)
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    loader = task_module(cfg.task).train_loader(cfg, rank=0, world_size=world_size)
    derived = derive(cfg, world_size, loader.steps_per_epoch)
    if is_main_rank():
        print(to_yaml(cfg, derived), end="")
    return 0


def run_task(task: str, argv: list[str] | None = None, doc: str | None = None) -> int:
    """The body of every training command: config -> Accelerator -> the task's Task -> the engine. User errors
    (config, data, command line) print one line and return 2; a run that cannot go on returns 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, flags = split_flags(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "help" in flags:  # before torch is imported
        print(usage(task, doc))
        return 0
    from mae.data import DataError
    from mae.eval.labelsets import ValLabels, pair_train_val
    from mae.tasks import load_config
    from mae.train.engine import seed_everything, train
    from mae.train.runtime import STOP, TrainingError, make_accelerator

    module = task_module(task)
    say = print if is_main_rank() else (lambda *a, **k: None)
    try:
        cfg = load_config(args, task=task, log=say)
        use = ValLabels(*module.VAL_LABELS) if module.VAL_LABELS else None
        cfg = pair_train_val(cfg, args, use, log=say)
        if "print-config" in flags:
            return print_config(cfg)
        acc = make_accelerator(cfg)  # installs the stop-signal handlers
        try:
            seed_everything(cfg.seed, acc.process_index)
            rc = train(cfg, acc, module.build_task(cfg, acc))
        finally:  # also when building the task fails: the caller's own handlers come back
            STOP.restore()
    except (ConfigError, DataError) as e:
        if not getattr(e, "quiet", False):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if rc == 0 and acc.is_main_process:
        out = Path(cfg.output_dir)
        for name, label in (
            ("metrics.jsonl", "metrics"),
            ("checkpoint-last", "checkpoint"),
            ("checkpoint-best", "best"),
            ("reconstruction-last.png", "reconstruction"),
        ):
            if (out / name).exists():
                print(f"{label + ':':<16}{out / name}")
    return rc


def command(task: str, doc: str | None):
    """(main, cli) of a training command: `main(argv=None) -> int` runs `task`; `cli()` exits with its code."""

    def main(argv: list[str] | None = None) -> int:
        return run_task(task, argv, doc)

    def cli() -> None:
        exit_with(main, f"mae-{task}", "a re-run resumes from the last checkpoint")

    return main, cli


# ----------------------------------------------------------------------------------------------------------
# every command's way out


class Stopped(BaseException):
    """SIGTERM reached a command outside a training loop (which stops by itself at a step). A BaseException, as
    KeyboardInterrupt: the `except Exception` of a library's optional import must not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


def exit_with(main, prog: str, after: str = "nothing was written") -> None:
    """The console entry of every command: exit with `main()`'s status. Ctrl-C (SIGINT) and SIGTERM end a
    command with one line saying so (`after`: what is left) and the shell's status for the signal (130, 143),
    never a traceback; outputs are written so that an interrupted command leaves none half-made. A training
    loop takes both signals over while it runs (it checkpoints the step and exits itself)."""
    import signal

    signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        code = main()
    except KeyboardInterrupt:
        code = _stopped(prog, signal.SIGINT, after)
    except Stopped as e:
        code = _stopped(prog, e.signum, after)
    sys.exit(code)


def _stopped(prog: str, signum: int, after: str) -> int:
    import signal

    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    print(f"{prog}: interrupted ({name}); {after}", file=sys.stderr, flush=True)
    return 128 + signum
