"""Write Accelerate's default config when the user has none, so that `accelerate launch` starts quietly.

Without a config, every `accelerate launch` begins with a block of "values were not passed" warnings. This
writes what `accelerate config default` writes (one machine, every local GPU, no mixed precision: the
entry points choose their precision from train.precision), with one change on a machine without GPUs:
`use_cpu: false`, because `use_cpu: true` makes every launch print a thread-count notice, and the entry
points fall back to the CPU by themselves. An existing config (yours, from `accelerate config`) is kept.
Prints one line saying which.
"""

import json
from pathlib import Path

import torch
from accelerate.commands.config.config_args import default_config_file
from accelerate.utils import write_basic_config


def main() -> None:
    path = Path(default_config_file)
    if path.is_file():
        print(f"accelerate: using your config {path}")
        return
    write_basic_config(mixed_precision="no", save_location=str(path))
    config = json.loads(path.read_text())
    if not torch.cuda.is_available():
        config["use_cpu"] = False
        path.write_text(json.dumps(config, indent=2) + "\n")
    where = f"{config['num_processes']} process(es)" if torch.cuda.is_available() else "no GPU: the CPU"
    print(f"accelerate: wrote its default config to {path} ({where}; `accelerate config` changes it)")


if __name__ == "__main__":
    main()
