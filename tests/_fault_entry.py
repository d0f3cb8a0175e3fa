"""A training command (`mae/pretrain.py`, or the task MAE_FAULT_TASK names) with faults injected for the
reliability tests, from the environment: MAE_FAULT_CKPT_DELAY=s sleeps s seconds inside every checkpoint write
(after this rank's own files, before the weights), so that a kill can land in the middle of one."""

import importlib
import os
import sys
import time

from mae.train import checkpoint

main = importlib.import_module(f"mae.{os.environ.get('MAE_FAULT_TASK', 'pretrain')}").main

delay = float(os.environ.get("MAE_FAULT_CKPT_DELAY", "0") or 0)
if delay:
    write_rank_files = checkpoint.write_rank_files

    def slow_write(tmp, rank):
        write_rank_files(tmp, rank)
        time.sleep(delay)

    checkpoint.write_rank_files = slow_write

sys.exit(main(sys.argv[1:]))
