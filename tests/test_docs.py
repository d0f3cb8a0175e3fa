"""Docs that cannot rot: every shell command shown in README.md, docs/*.md and slurm/README.md is either run
here (with tiny budgets) or listed in NOT_RUN with the reason it cannot run on a test machine; every ```python
block of README.md runs as shown.

A command is a line of a fenced ```bash / ```sh / ```shell / ```console block, or a line of an indented code
block that starts with a program (PROGRAMS). A command the docs show that is in neither table fails
`test_every_doc_command_is_classified`, naming it; so does a table entry the docs no longer show.

To classify a new command, add it (as the docs write it, trailing `# comment` removed) to RUN or NOT_RUN.
RUN maps it to the command actually run: "{doc}" stands for the command as written, USER_PATHS are replaced
by small stand-ins, and a budget is appended where the command would train or benchmark for real. The
commands run in the order the docs show them, in one sandbox directory, so `runs/demo` made by the README's
demo is there for the export, fine-tuning and visualisation commands after it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.conftest import needs_fmnist

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    "README.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
    "slurm/README.md",
]

# Tiny budgets, appended to a command's key=value overrides (the last value of a key wins).
DEMO = "train.max_steps=3 train.batch_size=32 checkpoint.every_steps=3 log.every_steps=1 data.num_workers=0"
TRANSFER = "train.max_steps=2 train.batch_size=32 log.every_steps=1 data.num_workers=0 data.val="  # eval: test_transfer.py
VIT = (
    "model.img_size=32 model.depth=1 model.decoder_depth=1 train.batch_size=4 train.max_steps=1 "
    "data.num_workers=0 log.viz_images=0"
)
# the segmentation demo: 2 steps of 8 scenes, no evaluation (tests/test_segment.py evaluates)
SEGMENT = "train.max_steps=2 train.batch_size=8 data.epoch_samples=16 log.every_steps=1 data.num_workers=0 data.val="
# the detection demo: 2 steps of 4 scenes, no evaluation (tests/test_detection.py evaluates)
DETECT = (
    "train.max_steps=2 train.batch_size=4 data.epoch_samples=8 log.every_steps=1 data.num_workers=0 data.val="
)
BENCH = "--img-size 32 --batch 2 --steps 1 --warmup 1 --rounds 1 --matmul-size 128"
BENCH_MODEL = f"--model mae_vit_tiny_patch16 {BENCH}"  # ViT-B's init alone takes seconds per configuration

# Paths that stand for the user's own data -> stand-ins the sandbox holds (a labelled folder of RGB images).
USER_PATHS = {"/data/my_images": "my_images", "/data/images": "my_images", "/data/bands": "my_bands"}

RUN = {
    # README.md
    "bash scripts/setup.sh && .venv/bin/python mae/pretrain.py recipe=demo":
        f".venv/bin/python mae/pretrain.py recipe=demo {DEMO}",  # setup.sh: the first step of CI (.ci/run)
    "python mae/pretrain.py --help": "{doc}",
    "python mae/pretrain.py recipe=demo train.batch_size=128 --print-config": "{doc}",
    "accelerate launch mae/pretrain.py recipe=vit_base data.train='shards/train-{000000..001023}.tar'":
        f"{{doc}} data.train=synthetic output_dir=runs/doc_vit_base_shards {VIT}",
    "python mae/pretrain.py recipe=demo train.epochs=10 output_dir=runs/demo10": f"{{doc}} {DEMO}",
    "mae-viz runs/demo photo.jpg other.png --out recon.png": "{doc}",
    "accelerate launch mae/pretrain.py recipe=vit_base data.train=/data/my_images":
        f"{{doc}} output_dir=runs/doc_vit_base_folder {VIT}",
    "python -m data_tools.make_shards /data/my_images shards/ --resize 256 --workers 8": "{doc}",
    "python -m data_tools.verify_shards shards/": "{doc}",
    "accelerate launch mae/pretrain.py recipe=vit_base data.train=shards/":
        f"{{doc}} output_dir=runs/doc_vit_base_shard_dir {VIT}",
    "python mae/pretrain.py recipe=demo model.init=runs/demo data.train=/data/my_images output_dir=runs/demo_mine":
        f"{{doc}} {DEMO} train.batch_size=4",  # the stand-in folder holds 12 images
    "python mae/finetune.py recipe=finetune_demo model.init=runs/demo": f"{{doc}} {TRANSFER}",
    "mae-export runs/demo out/timm --to timm": "{doc}",
    "mae-export runs/demo out/hf --to hf": "{doc}",
    "mae-export out/hf out/back --to mae": "{doc}",
    "mae-embed runs/demo fashion-mnist:test out/emb": "{doc} --max-samples 200",
    "mae-embed runs/demo fashion-mnist out/emb_train --knn fashion-mnist:test --neighbours 5":
        "{doc} --max-samples 300 --knn-max-samples 100",
    "accelerate launch -m mae.embed runs/demo /data/my_images out/mine": "{doc}",
    "mae-bench --model mae_vit_base_patch16 --batch 16 --dtype fp32,bf16": f"{{doc}} {BENCH_MODEL}",
    "mae-bench --recipe demo --json demo.json": "{doc} --steps 1 --warmup 1 --rounds 1 --matmul-size 128",
    ".venv/bin/ruff check . && .venv/bin/ruff format --check .": "cd {root} && {doc}",
    # docs/data.md
    "python -m data_tools.stats /data/bands --in-chans 4": "{doc}",
    "python -m data_tools.stats fashion-mnist": "{doc}",
    "python mae/pretrain.py recipe=vit_base data.train=/data/bands model.in_chans=4 "
    "data.mean='[0.1123,0.1045,0.0987,0.2311]' data.std='[0.0543,0.0498,0.0512,0.0921]'":
        f"{{doc}} output_dir=runs/doc_bands {VIT}",
    "python -m data_tools.make_shards /data/bands shards_bands/": "{doc}",
    "python -m data_tools.bench": "{doc} --images 16 --size 64x48 --workers 1 --repeats 1 --batch-size 4",
    # docs/performance.md
    "mae-bench --batch 16 --dtype fp32,bf16 --attn math,sdpa": f"{{doc}} {BENCH_MODEL}",
    # compile off: inductor's C++ build alone takes minutes on 2 CPU cores; the rest of the command runs
    "mae-bench --recipe demo --compile off,on --json demo.json":
        "{doc} --compile off --steps 1 --warmup 1 --rounds 1 --matmul-size 128",
    'mae-bench --config "dtype=bf16 attn=math optimizer=forloop" --config "dtype=bf16 compile=on"':
        f'mae-bench --config "dtype=bf16 attn=math optimizer=forloop" --config "dtype=bf16 compile=off" {BENCH_MODEL}',
    "mae-bench --data shards/ /data/images fashion-mnist --img-size 224": "{doc} --workers 0 --data-batches 2 --batch 4",
    "mae-bench --data /data/images --decode cpu,device --reference --batch 32 --data-batches 4 --rounds 3":
        "{doc} --workers 1 --batch 4 --data-batches 1 --rounds 1",
    # docs/transfer.md
    "python mae/pretrain.py recipe=demo output_dir=runs/demo": f"{{doc}} {DEMO}",
    "python mae/finetune.py recipe=finetune_demo model.init=runs/demo output_dir=runs/finetune_demo":
        f"{{doc}} {TRANSFER}",
    "python mae/finetune.py recipe=finetune_demo output_dir=runs/finetune_demo_scratch": f"{{doc}} {TRANSFER}",
    "python mae/linprobe.py recipe=linprobe_demo model.init=runs/demo output_dir=runs/linprobe_demo":
        f"{{doc}} {TRANSFER}",
    "python mae/linprobe.py recipe=linprobe_demo output_dir=runs/linprobe_demo_scratch": f"{{doc}} {TRANSFER}",
    # docs/transfer.md: continued pretraining on the digits
    "python experiments/digits.py data data/digits":
        "{doc}",
    "python mae/pretrain.py recipe=demo model.init=runs/demo output_dir=runs/digits_continued data.train=data/digits/train data.val=data/digits/test data.mean=[0.310] data.std=[0.349] data.hflip=false train.epochs=40 train.warmup_epochs=4 log.knn_every_steps=50 checkpoint.every_steps=100":
        f"{{doc}} {DEMO}",
    "python mae/pretrain.py recipe=demo output_dir=runs/digits_scratch data.train=data/digits/train data.val=data/digits/test data.mean=[0.310] data.std=[0.349] data.hflip=false train.epochs=40 train.warmup_epochs=4 log.knn_every_steps=50 checkpoint.every_steps=100":
        f"{{doc}} {DEMO}",
    "python mae/finetune.py recipe=finetune_demo model.init=runs/digits_continued output_dir=runs/digits_finetune_continued data.train=data/digits/train data.val=data/digits/test data.mean=[0.310] data.std=[0.349] data.hflip=false":
        f"{{doc}} {TRANSFER}",
    "python mae/finetune.py recipe=finetune_demo model.init=runs/digits_scratch output_dir=runs/digits_finetune_scratch data.train=data/digits/train data.val=data/digits/test data.mean=[0.310] data.std=[0.349] data.hflip=false":
        f"{{doc}} {TRANSFER}",
    "python mae/finetune.py recipe=finetune_demo model.init=runs/demo output_dir=runs/digits_finetune_demo data.train=data/digits/train data.val=data/digits/test data.mean=[0.310] data.std=[0.349] data.hflip=false":
        f"{{doc}} {TRANSFER}",
    "python mae/linprobe.py recipe=linprobe_demo model.init=runs/digits_continued output_dir=runs/digits_linprobe_continued data.train=data/digits/train data.val=data/digits/test data.mean=[0.310] data.std=[0.349] data.hflip=false":
        f"{{doc}} {TRANSFER}",
    "python mae/linprobe.py recipe=linprobe_demo model.init=runs/digits_scratch output_dir=runs/digits_linprobe_scratch data.train=data/digits/train data.val=data/digits/test data.mean=[0.310] data.std=[0.349] data.hflip=false":
        f"{{doc}} {TRANSFER}",
    "python mae/linprobe.py recipe=linprobe_demo model.init=runs/demo output_dir=runs/digits_linprobe_demo data.train=data/digits/train data.val=data/digits/test data.mean=[0.310] data.std=[0.349] data.hflip=false":
        f"{{doc}} {TRANSFER}",
    "python experiments/digits.py report runs":
        "{doc}",
    # README.md and docs/segmentation.md: the segmentation demo
    "python mae/segment.py recipe=segment_demo model.init=runs/demo": f"{{doc}} {SEGMENT}",
    "python experiments/segment_demo.py scenes scenes/ --count 8": "{doc}",
    "mae-segment-predict runs/segment_demo scenes/images predictions/": "{doc}",
    "python mae/segment.py recipe=segment_demo model.init=runs/demo output_dir=runs/segment_demo": f"{{doc}} {SEGMENT}",
    "python mae/segment.py recipe=segment_demo output_dir=runs/segment_demo_scratch": f"{{doc}} {SEGMENT}",
    "python mae/segment.py recipe=segment_demo model.init=runs/demo model.seg_head=linear train.freeze_encoder=true output_dir=runs/segment_demo_linear":
        f"{{doc}} {SEGMENT}",
    "python mae/segment.py recipe=segment_demo model.seg_head=linear train.freeze_encoder=true output_dir=runs/segment_demo_linear_random":
        f"{{doc}} {SEGMENT}",
    "python experiments/segment_demo.py report runs": "{doc}",
    "python experiments/dense_study.py --pilot": "python experiments/dense_study.py --quick --pilot --out runs/dense_quick",
    "python experiments/dense_study.py": "python experiments/dense_study.py --quick --out runs/dense_quick",
    "python experiments/dense_study.py --doc docs/segmentation.md":  # not over the committed doc
        "cp {root}/docs/segmentation.md seg.md && python experiments/dense_study.py --quick --out runs/dense_quick --doc seg.md",
    "python experiments/dense_study.py --quick": "{doc} --out runs/dense_quick",
    "python experiments/segment_demo.py figure runs/segment_demo docs/segment_demo.png":
        "python experiments/segment_demo.py figure runs/segment_demo figure.png",  # not over the committed one
    # README.md and docs/detection.md: the detection demo
    "python mae/detect.py recipe=detect_demo model.init=runs/demo": f"{{doc}} {DETECT}",
    "python experiments/detect_demo.py scenes instances/ --count 8": "{doc}",
    "mae-detect-predict runs/detect_demo instances detections/": "{doc}",
    "python mae/detect.py recipe=detect_demo model.init=runs/demo output_dir=runs/detect_demo": f"{{doc}} {DETECT}",
    "python mae/detect.py recipe=detect_demo output_dir=runs/detect_demo_scratch": f"{{doc}} {DETECT}",
    "python experiments/detect_demo.py report runs": "{doc}",
    "python experiments/detect_demo.py figure runs/detect_demo docs/detect_demo.png --score-thresh 0.3":
        "python experiments/detect_demo.py figure runs/detect_demo figure.png --count 2 --score-thresh 0.3",  # not over the committed one
    "python benchmarks/detect_bench.py":
        "{doc} --steps 1 --warmup 1 --vit-size 64 --block-size 64 --vit-overrides model.embed_dim=64 model.num_heads=2 model.depth=4 "
        "model.fpn_channels=16",
    # docs/transfer.md: embeddings
    "mae-embed runs/demo fashion-mnist out/demo_monitor --max-samples 5000 --knn fashion-mnist:test --knn-max-samples 1000":
        "{doc} --max-samples 300 --knn-max-samples 100",
    "mae-embed runs/demo fashion-mnist out/demo_emb --knn fashion-mnist:test --neighbours 5":
        "{doc} --max-samples 300 --knn-max-samples 100",
    "mae-embed runs/demo fashion-mnist out/demo_emb_cls --pool cls --knn fashion-mnist:test":
        "{doc} --max-samples 300 --knn-max-samples 100",
}  # fmt: skip

SUITE = "the test suite itself (this test is part of it); CI runs it (.ci/run)"
CLUSTER = "needs a SLURM cluster; tests/test_slurm.py runs these scripts on a local one"
PLACEHOLDERS = "a template: `...` stands for the user's own data"
NOT_RUN = {
    # README.md
    ".venv/bin/python -m pytest": SUITE,
    '.venv/bin/python -m pytest -m "not slow"': SUITE,
    "bash scripts/setup.sh && .venv/bin/python -m pytest": SUITE,
    "accelerate launch --multi_gpu --num_processes 8 mae/pretrain.py recipe=vit_large data.train=/data/shards":
        "8 GPUs; tests/test_pretrain.py runs the 2-process launch on the CPU",
    "accelerate launch mae/pretrain.py recipe=vit_base model.init=mae_visualize_vit_base.pth data.train=/data/my_images":
        "the reference release's weights are a download; tests/test_init.py loads reference-format files it writes",
    "accelerate launch mae/finetune.py recipe=finetune_vit_base model.init=runs/vit_base data.train=... data.val=...":
        PLACEHOLDERS,
    "accelerate launch mae/linprobe.py recipe=linprobe_vit_base model.init=runs/vit_base data.train=... data.val=...":
        PLACEHOLDERS,
    "accelerate launch --multi_gpu --num_processes 8 mae/segment.py recipe=segment_ade20k_vit_base model.init=runs/vit_base data.train=/data/ADEChallengeData2016 data.val=/data/ADEChallengeData2016":
        "8 GPUs and ADE20K (a download); tests/test_segment.py runs the recipe on a tiny ADE20K-layout folder",
    "accelerate launch --multi_gpu --num_processes 8 mae/detect.py recipe=detect_coco_vit_base model.init=runs/vit_base data.train=/data/coco data.val=/data/coco":
        "8 GPUs and COCO (a download); tests/test_detection.py runs the recipe's path on a tiny COCO-layout folder",
    # docs/data.md
    "python -m data_tools.make_shards SOURCE OUTPUT_DIR [options]": "a synopsis; the README's make_shards runs",
    "python -m data_tools.verify_shards OUTPUT_DIR [--json report.json]": "a synopsis; the README's verify runs",
    # docs/performance.md
    "accelerate launch --multi_gpu --num_processes 8 mae/pretrain.py recipe=vit_huge train.fsdp=true":
        "8 GPUs; tests/test_fsdp.py runs FSDP over 2 CPU processes",
    "bash scripts/gpu_wheels.sh": "downloads wheels from PyPI for the GPU machine",
    "GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh /tmp/dry": "minutes; tests/test_gpu_check.py runs this dry run",
    "bash benchmarks/gpu_check.sh": "needs a CUDA device; tests/test_gpu_check.py runs its dry run on the CPU",
    "cp <files_at>/h200-YYYY-MM-DD*.json <files_at>/h200-YYYY-MM-DD*-profile.txt benchmarks/results/":
        "copies a GPU run's files, which only a GPU run writes",
    "python benchmarks/gpu_results.py benchmarks/results/h200-*.json":
        "needs a GPU run's results file; tests/test_gpu_results.py runs the generator on results files",
    # docs/reliability.md
    ".venv/bin/python -m pytest tests/test_reliability.py": SUITE,
    ".venv/bin/python -m pytest tests/test_signals.py": SUITE,
    ".venv/bin/python -m pytest tests/test_slurm.py": SUITE,
    ".venv/bin/python -m pytest tests/test_outputs.py tests/test_record.py": SUITE,
    # slurm/README.md
    "sbatch slurm/pretrain.sbatch recipe=vit_large train.epochs=1600": CLUSTER,
    "sbatch slurm/finetune.sbatch recipe=finetune_vit_base model.init=runs/mae-pretrain": CLUSTER,
    "sbatch slurm/linprobe.sbatch recipe=linprobe_vit_base model.init=runs/mae-pretrain": CLUSTER,
    "sbatch slurm/segment.sbatch recipe=segment_ade20k_vit_base model.init=runs/mae-pretrain data.train=/data/ADEChallengeData2016 data.val=/data/ADEChallengeData2016":
        CLUSTER,
    "sbatch slurm/detect.sbatch recipe=detect_coco_vit_base model.init=runs/mae-pretrain data.train=/data/coco data.val=/data/coco":
        CLUSTER,
    "sbatch -p gpu -A myproject --job-name=vitl-1600ep --nodes=8 slurm/pretrain.sbatch recipe=vit_large": CLUSTER,
    "export SBATCH_PARTITION=gpu SBATCH_ACCOUNT=myproject": CLUSTER,
    "sudo scripts/slurm_local.sh start": "installs and starts SLURM as root; tests/test_slurm.py does it",
    'eval "$(scripts/slurm_local.sh env)"': CLUSTER,
    "MAE_PROCS_PER_NODE=2 sbatch --gpus-per-node=0 --cpus-per-task=2 slurm/pretrain.sbatch recipe=demo": CLUSTER,
    "scancel --signal=USR1 <job id>": CLUSTER,
    "sudo scripts/slurm_local.sh stop": CLUSTER,
    "pytest -m slurm": SUITE,
}  # fmt: skip

SHELL_FENCES = ("bash", "sh", "shell", "console")
PROGRAMS = re.compile(
    r"^(python3?|\.venv/bin/\S+|bash|sudo|accelerate|torchrun|mae-\S+|pytest|ruff|sbatch|srun|scancel|squeue|"
    r"scontrol|export|eval|tensorboard|pip|apt-get|scripts/\S+)\b"
)


# ----------------------------------------------------------------------------- extraction


def _strip_comment(line: str) -> str:
    return re.sub(r"(^|\s)#.*$", "", line).strip()


def _is_command(line: str) -> bool:
    """Indented blocks mix commands and sample output: a command starts with a program (after VAR=value)."""
    words = line.split()
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words = words[1:]
    return bool(words) and bool(PROGRAMS.match(words[0]))


def doc_commands(path: Path) -> list[str]:
    """The shell commands of one markdown file, in order (continuation lines joined, comments removed)."""
    out, fence, prev_blank, indented = [], None, True, False
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if fence is None and stripped.startswith("```"):
            fence = stripped[3:].strip().lower()
            continue
        if fence is not None:
            if stripped.startswith("```"):
                fence = None
            elif fence in SHELL_FENCES:
                line = pending + _strip_comment(raw.removeprefix("$ "))
                pending = line[:-1] + " " if line.endswith("\\") else ""
                if line and not pending:
                    out.append(" ".join(line.split()))
            continue
        indented = raw.startswith("    ") and (indented or prev_blank)
        if indented and _is_command(stripped):
            out.append(" ".join(_strip_comment(stripped).split()))
        prev_blank = not stripped
    return out


def all_doc_commands() -> list[tuple[str, str]]:
    """(doc file, command), README first, then docs/*.md, then slurm/README.md; each command once."""
    seen, out = set(), []
    for doc in DOCS:
        for cmd in doc_commands(ROOT / doc):
            if cmd not in seen:
                seen.add(cmd)
                out.append((doc, cmd))
    return out


def test_every_doc_command_is_classified():
    shown = dict((cmd, doc) for doc, cmd in all_doc_commands())
    unclassified = [f"{doc}: {cmd}" for cmd, doc in shown.items() if cmd not in RUN and cmd not in NOT_RUN]
    stale = [cmd for cmd in (*RUN, *NOT_RUN) if cmd not in shown]
    assert not unclassified, (
        "commands in the docs that tests/test_docs.py neither runs nor lists in NOT_RUN:\n"
        + ("\n".join(unclassified))
    )
    assert not stale, "tests/test_docs.py classifies commands the docs no longer show:\n" + "\n".join(stale)
    assert not set(RUN) & set(NOT_RUN)


def test_extraction_reads_fences_indented_blocks_and_continuations(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "Intro\n\n```bash\n# a comment\nmae-export a b --to timm   # trailing\npython x.py \\\n  k=v\n```\n\n"
        "```python\nimport mae\n```\n\n    python mae/pretrain.py recipe=demo\n    initialised from runs/demo\n"
        "    FOO=1 sbatch job.sbatch\n"
    )
    assert doc_commands(doc) == [
        "mae-export a b --to timm",
        "python x.py k=v",
        "python mae/pretrain.py recipe=demo",
        "FOO=1 sbatch job.sbatch",
    ]


# ----------------------------------------------------------------------------- running them


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A directory that looks like the checkout (links to its code) plus the user's stand-in files."""
    box = tmp_path_factory.mktemp("docs")
    for name in (
        "mae",
        "recipes",
        "scripts",
        "data_tools",
        "experiments",
        "benchmarks",
        "slurm",
        "pyproject.toml",
        ".venv",
    ):
        if (ROOT / name).exists():
            (box / name).symlink_to(ROOT / name)
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (box / "my_images" / cls).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(box / "my_images" / cls / f"{i}.jpg")
    for cls in ("field", "forest"):  # 4-band 16-bit tiles, as .npy and as TIFF
        (box / "my_bands" / cls).mkdir(parents=True)
        for i in range(4):
            bands = rng.integers(0, 65536, (40, 48, 4), dtype=np.uint16)
            np.save(box / "my_bands" / cls / f"{i}.npy", bands)
            tifffile.imwrite(
                box / "my_bands" / cls / f"{i}.tif", bands, photometric="minisblack", planarconfig="contig"
            )
    shutil.copy(box / "my_images" / "cat" / "0.jpg", box / "photo.jpg")
    Image.open(box / "my_images" / "dog" / "0.jpg").save(box / "other.png")
    _console_scripts(box / "bin")
    return box


def _console_scripts(bin_dir: Path) -> None:
    """pyproject.toml's console scripts that the environment's install predates (a new entry point, before
    `pip install -e .` is repeated), as small scripts in bin_dir, which _env puts on PATH after the venv."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: a fresh install has every script
        return
    bin_dir.mkdir()
    for name, target in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"].items():
        if shutil.which(name, path=str(Path(sys.executable).parent)):
            continue
        module, func = target.split(":")
        (bin_dir / name).write_text(
            f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n"
        )
        (bin_dir / name).chmod(0o755)


def _env(box: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), str(box / "bin"), env.get("PATH", "")])
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT)
    env.update(HF_HOME=str(box / "hf"), WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def command_to_run(cmd: str) -> str:
    run = RUN[cmd].replace("{doc}", cmd).replace("{root}", str(ROOT))
    for user, stand_in in USER_PATHS.items():
        run = run.replace(user, stand_in)
    return run


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("cmd", [cmd for _, cmd in all_doc_commands() if cmd in RUN])
def test_doc_command_runs(cmd, sandbox):
    run = command_to_run(cmd)
    r = subprocess.run(
        ["bash", "-c", run], cwd=sandbox, env=_env(sandbox), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, (
        f"`{cmd}` (run as `{run}`) exited {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}"
    )


def readme_python() -> list[str]:
    """The ```python blocks of README.md, in order."""
    blocks, current = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if current is None and line.strip().lower() == "```python":
            current = []
        elif current is not None and line.strip().startswith("```"):
            blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return blocks


# What the README's Python uses, made by the README's own commands when this test runs alone.
PYTHON_NEEDS = {
    "runs/demo/checkpoint-last": "bash scripts/setup.sh && .venv/bin/python mae/pretrain.py recipe=demo",
    "out/hf/config.json": "mae-export runs/demo out/hf --to hf",
}


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("block", range(len(readme_python())))
def test_readme_python_runs(block, sandbox):
    for made, cmd in PYTHON_NEEDS.items():
        if not (sandbox / made).exists():
            r = subprocess.run(["bash", "-c", command_to_run(cmd)], cwd=sandbox, env=_env(sandbox),
                               capture_output=True, text=True, timeout=600)  # fmt: skip
            assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    code = readme_python()[block]
    r = subprocess.run([sys.executable, "-c", code], cwd=sandbox, env=_env(sandbox), capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, (
        f"README python block {block}:\n{code}\nexited {r.returncode}:\n{r.stderr[-3000:]}"
    )
