"""`mae/pretrain.py` with faults injected for the reliability tests, from the environment:
MAE_FAULT_CKPT_DELAY=s sleeps s seconds inside every checkpoint write (after this rank's own files, before the
weights), so that a kill can land in the middle of one."""

import os
import sys
import time

from mae.pretrain import main
from mae.train import checkpoint

delay = float(os.environ.get("MAE_FAULT_CKPT_DELAY", "0") or 0)
if delay:
    write_rank_files = checkpoint.write_rank_files

    def slow_write(tmp, rank):
        write_rank_files(tmp, rank)
        time.sleep(delay)

    checkpoint.write_rank_files = slow_write

sys.exit(main(sys.argv[1:]))
