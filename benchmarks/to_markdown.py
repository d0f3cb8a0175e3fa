"""Markdown table of a mae-bench JSON report: one row per configuration, speed relative to the first row.

python benchmarks/to_markdown.py runs/bench_cpu/vit_base.json [--relative-to N]
"""

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report")
    p.add_argument("--relative-to", type=int, default=0, help="row index the speed-ups refer to")
    args = p.parse_args()
    rep = json.load(open(args.report))
    peaks = ", ".join(f"{k} {v * 1e3:.0f} GFLOP/s" for k, v in rep["matmul_peak_tflops"].items())
    print(f"{rep['model']}{' (recipe ' + rep['recipe'] + ')' if rep['recipe'] else ''}, {rep['device']}, "
          f"{rep['threads']} threads; same-run GEMM peak: {peaks}\n")  # fmt: skip
    print(
        "| dtype | attention | AdamW | compile | ckpt | batch | px | mask | img/s | vs row 1 | GFLOP/s | MFU | peak GB | MB/img |"
    )
    print("|" + " --- |" * 14)
    ref = rep["results"][args.relative_to]["img_per_s"]
    for r in rep["results"]:
        c = r["config"]
        if r["error"]:
            print(
                f"| {c['dtype']} | {c['attn']} | {c['optimizer']} | | | {c['batch']} | | | {r['error']} | | | | | |"
            )
            continue
        print(f"| {c['dtype']} | {r['attn_used']} | {c['optimizer']} | {'on' if c['compile'] else 'off'} | "
              f"{'on' if c['grad_ckpt'] else 'off'} | {c['batch']} | {c['img_size']} | {c['mask_ratio']:g} | "
              f"{r['img_per_s']:.2f} | {r['img_per_s'] / ref:.2f}x | {r['tflops'] * 1e3:.0f} | "
              f"{100 * r['mfu_measured']:.1f}% | {r['peak_mem_gb']:.2f} | {r['mem_per_img_mb']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
