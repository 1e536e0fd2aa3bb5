"""Studies: one module per command under the command's own name (typed request in, files out: rank-0 I/O, resume,
refusals on every rank, progress) and the grid runner they share (grid.py). A study imports no other study."""
