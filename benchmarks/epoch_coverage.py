"""What one training epoch over shards covers: unseen and repeated samples, simulated from the assignment
functions alone (no data is read).

    python benchmarks/epoch_coverage.py                          # the recipes' example layouts
    python benchmarks/epoch_coverage.py --shards 64 --samples 80000 --ranks 8 --workers 6 --batch 256

Two assignments side by side:
- whole shards: the shard list split by rank then by worker (webdataset's split_by_node / split_by_worker;
  with fewer shards than workers, every (ranks x workers)-th sample of all shards), each worker producing a
  fixed quota of batches and starting another, reshuffled pass when its share runs out;
- spans (mae.data.shards): each (rank, worker) reads its worker_span of the epoch's sample sequence,
  pieces of shards included.
"""

import argparse

import numpy as np

from mae.data.shards import epoch_pieces, pass_order, worker_span

LAYOUTS = {  # recipe: (ranks, batch per rank), 10 loader workers per rank, ImageNet-1k in 1024 shards
    "vit_base": (32, 128),
    "vit_large": (64, 64),
    "vit_huge": (128, 32),
}


def shard_sizes(num_shards: int, samples: int) -> list[int]:
    """`samples` spread over `num_shards` shards as evenly as integers allow (1251 or 1252 for ImageNet)."""
    base, extra = divmod(samples, num_shards)
    return [base + (i < extra) for i in range(num_shards)]


def whole_shard_reads(sizes, ranks, workers, steps, batch, seed=0, epoch=0) -> np.ndarray:
    """Times each sample is read in one epoch when workers own whole shards and fixed batch quotas. A pass
    that the quota cuts short reads a uniform draw of its samples (what a shuffle buffer as large as the
    worker's share gives)."""
    offsets = np.cumsum([0, *sizes])
    reads = np.zeros(offsets[-1], dtype=np.int32)
    rng = np.random.default_rng(seed)
    for rank in range(ranks):
        for role in range(workers):
            need = (steps // workers + (role < steps % workers)) * batch
            for p in range(need):  # passes until the quota is met, each over a reshuffled shard list
                order = pass_order(len(sizes), seed, epoch, p)
                if len(sizes) >= ranks * workers:
                    mine = order[rank::ranks][role::workers]
                    pool = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in mine])
                else:  # fewer shards than workers: every (ranks x workers)-th sample of all shards
                    pool = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in order])
                    pool = pool[rank * workers + role :: ranks * workers]
                take = pool if len(pool) <= need else rng.choice(pool, need, replace=False)
                reads[take] += 1
                need -= len(take)
                if need == 0 or len(pool) == 0:
                    break
    return reads


def span_reads(sizes, ranks, workers, steps, batch, seed=0, epoch=0) -> tuple[np.ndarray, int]:
    """Times each sample is read in one epoch when each (rank, worker) reads its worker_span, and the
    samples read without decoding to reach the pieces that start inside a shard."""
    offsets = np.cumsum([0, *sizes])
    reads, skipped = np.zeros(offsets[-1], dtype=np.int32), 0
    for rank in range(ranks):
        for role in range(workers):
            begin, end = worker_span(rank, role, ranks, workers, steps, batch)
            for i, first, stop in epoch_pieces(sizes, seed, epoch, begin, end):
                reads[offsets[i] + first : offsets[i] + stop] += 1
                skipped += first
    return reads, skipped


def coverage(reads: np.ndarray) -> tuple[float, float]:
    """(% of samples never read, % read more than once)."""
    return 100 * float(np.mean(reads == 0)), 100 * float(np.mean(reads > 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=1024)
    ap.add_argument(
        "--samples", type=int, default=1_281_167, help="samples in all shards (ImageNet-1k train)"
    )
    ap.add_argument("--workers", type=int, default=10, help="loader workers per rank")
    ap.add_argument("--ranks", type=int, default=0, help="with --batch: one layout instead of the recipes'")
    ap.add_argument("--batch", type=int, default=0, help="batch per rank")
    args = ap.parse_args()
    layouts = {"custom": (args.ranks, args.batch)} if args.ranks and args.batch else LAYOUTS
    sizes = shard_sizes(args.shards, args.samples)
    print(f"{args.shards} shards, {args.samples} samples, {args.workers} workers per rank")
    print("| layout | ranks x batch | steps | whole shards: unseen / repeated | spans: unseen / repeated "
          "| spans: skipped undecoded |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (ranks, batch) in layouts.items():
        steps = args.samples // (ranks * batch)
        old = coverage(whole_shard_reads(sizes, ranks, args.workers, steps, batch))
        reads, skipped = span_reads(sizes, ranks, args.workers, steps, batch)
        new = coverage(reads)
        print(
            f"| {name} | {ranks} x {batch} | {steps} | {old[0]:.2f}% / {old[1]:.2f}% | {new[0]:.3f}% / {new[1]:.3f}% "
            f"| {100 * skipped / args.samples:.1f}% |"
        )


if __name__ == "__main__":
    main()
