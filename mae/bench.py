"""Benchmark the MAE training step and the input pipeline.

    mae-bench --model mae_vit_base_patch16 --batch 16 --dtype fp32,bf16 --attn math,sdpa
    mae-bench --recipe demo --dtype bf16 --compile off,on --json demo.json
    mae-bench --model mae_vit_large_patch16 --batch 128,256 --compile off,on,max-autotune-no-cudagraphs
    mae-bench --data shards/ /data/images fashion-mnist
    mae-bench --data /data/images --decode cpu,device --reference     # per worker, vs the reference loader
    mae-bench --recipe vit_large --compile on --config optimizer=fused --config noise=host --profile prof.txt

A step is the training loop's own (mae.train.step.StepRunner under an Accelerator): forward under autocast (the
masking noise drawn outside the model and passed in, as the loop does), backward, AdamW step, zero_grad. Every combination of the comma-separated
switches is measured in the same process, round-robin over `--rounds` rounds (the best round of each is
reported: a shared machine only ever slows a run down), next to a large-GEMM peak timed in the same rounds on
the same device. `--loss`, `--noise`, `--optimizer fused-capturable` and `--profile` serve the GPU check's
levers (benchmarks/gpu_check.sh).

FLOPs: mae.perf.step.mae_flops (every matmul, analytically; MFU against the measured GEMM peak).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(prog="mae-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="with --recipe: key=value config overrides (model.*)")
    p.add_argument("--recipe", default="", help="take the model, batch size and mask ratio from this recipe")
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--batch", default="", help="comma list (default 16, or the recipe's train.batch_size)")
    p.add_argument("--img-size", default="", help="comma list (default 224, or the recipe's)")
    p.add_argument("--mask-ratio", default="", help="comma list (default 0.75, or the recipe's)")
    p.add_argument("--dtype", default="auto", help="comma list of fp32, bf16, fp16, auto")
    p.add_argument("--attn", default="sdpa", help="comma list of sdpa, math, xformers")
    p.add_argument("--compile", default="off", help="comma list of on/off or torch.compile modes (default, "
                   "reduce-overhead, max-autotune, max-autotune-no-cudagraphs)")  # fmt: skip
    p.add_argument("--optimizer", default="fused",
                   help="comma list of AdamW implementations: fused, fused-capturable, foreach, forloop")  # fmt: skip
    p.add_argument("--grad-ckpt", default="off", help="comma list of on/off (activation checkpointing)")
    p.add_argument("--loss", default="graph",
                   help="comma list of graph (the loss and norm_pix target inside the model, compiled with it) "
                   "and eager (computed after the compiled encoder + decoder)")  # fmt: skip
    p.add_argument("--noise", default="device",
                   help="comma list of device (masking noise drawn on the device) and host (drawn as the "
                   "training loop does: numpy on the host, then a blocking copy)")  # fmt: skip
    p.add_argument("--config", action="append", default=[], metavar="'KEY=V KEY=V'",
                   help="an explicit configuration instead of the grid (repeatable); keys: batch, img_size, "
                   "mask_ratio, dtype, attn, compile, optimizer, grad_ckpt, loss, noise; unset keys take the first "
                   "value of their flag")  # fmt: skip
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--rounds", type=int, default=1, help="round-robin repeats; the best round is reported")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument(
        "--matmul-size", type=int, default=0, help="GEMM size for the peak (0 = 2048 CPU, 8192 CUDA)"
    )
    p.add_argument(
        "--peak-tflops", type=float, default=0.0, help="nominal peak of the dtype(s) for a 2nd MFU"
    )
    p.add_argument(
        "--data", nargs="+", metavar="SOURCE", help="benchmark the input pipeline on these sources"
    )
    p.add_argument("--workers", type=int, default=0, help="--data: loader worker processes (0 = in-process)")
    p.add_argument("--data-batches", type=int, default=20, help="--data: timed batches per source and round")
    p.add_argument(
        "--decode", default="cpu", help="--data: comma list of data.decode modes (cpu, device, auto)"
    )
    p.add_argument(
        "--reference", action="store_true", help="--data: add the reference MAE loader (image folders)"
    )
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--profile", default="",
                   help="after timing the first configuration, profile a few of its steps (torch.profiler) "
                   "and write the top ops by device time to this file")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from mae.config import ConfigError
    from mae.data import DataError
    from mae.perf.grid import run_bench, run_data, write_json
    from mae.perf.step import BenchError, format_table

    try:
        if args.data:
            from mae.perf.data import format_rows

            report = run_data(args)
            print(format_rows(report))
        else:
            report = run_bench(args)
            print(format_table(report))
    except (BenchError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        write_json(args.json, report)
    return 0


def cli() -> None:
    from mae.cli import exit_with

    exit_with(main, "mae-bench")


if __name__ == "__main__":
    cli()
