"""Run directories: one run per directory (the lock), what a run records, outputs written atomically and
never over their inputs."""
