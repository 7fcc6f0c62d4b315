"""Pollen's ServerApp side: run config, run directory, checkpoints, the round loop and the CLI."""
