import os

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
