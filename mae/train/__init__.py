"""The trainer: the one training loop and what it needs around it (meter, runtime, checkpoints, FSDP,
optimizers, trackers). Tasks hand it a `Task`; it knows no task by name."""
