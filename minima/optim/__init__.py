"""Optimisation schedules: learning-rate scaling with the batch, gradual warmup, decay — pure functions of the step."""
