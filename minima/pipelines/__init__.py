"""The run layer: studies of many runs (the zoo) declared over minima's own training and measurement requests, and
the executors that start their processes (minima's local pool; Slurm through submitit)."""
