"""The files between stages: the checkpoint format, grid and sharpness result files, output names. No math."""
