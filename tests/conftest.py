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
