"""A training command (`mae/pretrain.py`, or the task MAE_FAULT_TASK names) with faults injected for the
reliability tests, from the environment: MAE_FAULT_CKPT_DELAY=s sleeps s seconds inside every checkpoint write
(after this rank's own files, before the weights), so that a kill can land in the middle of one;
MAE_FAULT_EVAL_DELAY=s makes every batch of an evaluation loader (the evaluation's, the k-NN monitor's) s seconds
slower (and MAE_FAULT_EVAL_MARK=path is created at the first), so that a signal lands in an evaluation that takes
far longer than a cluster's grace period."""

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

eval_delay = float(os.environ.get("MAE_FAULT_EVAL_DELAY", "0") or 0)
if eval_delay:
    from mae.data.detection import DetEvalLoader
    from mae.data.loaders import EvalLoader
    from mae.data.segmentation import SegEvalLoader

    mark = os.environ.get("MAE_FAULT_EVAL_MARK")

    def slowed(iterate):
        def slow_batches(self):
            for batch in iterate(self):
                if mark:
                    open(mark, "a").close()  # noqa: SIM115 (a mark the test waits for)
                time.sleep(eval_delay)
                yield batch

        return slow_batches

    for cls in (EvalLoader, SegEvalLoader, DetEvalLoader):
        cls.__iter__ = slowed(cls.__iter__)

sys.exit(main(sys.argv[1:]))
