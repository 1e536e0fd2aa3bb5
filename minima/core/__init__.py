"""Base layer: the vocabulary, requests ↔ flags/TOML, shared data options, memory, the torchrun environment and
refusals every rank sees, the float32 math policy, how commands end. Imports nothing else of minima."""
