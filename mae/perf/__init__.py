"""Performance measurement for `mae-bench`: the training step, the input pipeline, FLOPs and profiles."""
