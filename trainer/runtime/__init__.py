"""The process a run lives in: the process group and CPU threads, the torchrun agent's watch and the run lock."""
