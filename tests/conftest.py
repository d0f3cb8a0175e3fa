import json
import os
from pathlib import Path

import pytest

# Tests never talk to wandb's servers and never download anything.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def have_fashion_mnist() -> bool:
    return os.path.isfile(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz"))


needs_fmnist = pytest.mark.skipif(
    not have_fashion_mnist(), reason="Fashion-MNIST not installed (scripts/setup.sh)"
)


# The tiny encoder/decoder the end-to-end tests train on 28x28 Fashion-MNIST (patch 7: 16 patches).
TINY_MODEL = [
    "model.patch_size=7",
    "model.depth=2",
    "model.embed_dim=64",
    "model.num_heads=2",
    "model.decoder_embed_dim=32",
    "model.decoder_depth=1",
    "model.decoder_num_heads=2",
]


# A small ViT on 28x28 Fashion-MNIST: seconds per run on a laptop CPU.
TINY_FMNIST = [
    "recipe=demo",
    *TINY_MODEL,
    "train.batch_size=16",
    "train.precision=fp32",
    "train.warmup_epochs=0.002",
    "data.num_workers=0",
    "log.every_steps=1",
    "log.knn_every_steps=0",
    "log.viz_images=0",
]


def rows(out: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# `python TWO_CPU_PROCESSES script args`: two synchronised processes on the CPU (gloo), with
# ACCELERATE_USE_CPU=1 in the environment (`accelerate launch --cpu` starts only one).
TWO_CPU_PROCESSES = [
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def run_dir(path: Path, state: dict, keys: list[str], step: int = 2) -> Path:
    """A run directory as the training loop leaves it: config.yaml of `keys` (a command line), one checkpoint of
    the weights `state`, checkpoint-last."""
    from safetensors.torch import save_file

    from mae.config import to_yaml
    from mae.tasks import load_config

    ckpt = path / f"checkpoint-{step:08d}"
    ckpt.mkdir(parents=True)
    (path / "config.yaml").write_text(to_yaml(load_config(keys)))
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt / "model.safetensors"))
    (path / "checkpoint-last").symlink_to(ckpt.name)
    return path


@pytest.fixture
def one_thread():
    """In-process runs on one thread, as the suite's subprocesses: fp32 results then agree bit for bit."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
