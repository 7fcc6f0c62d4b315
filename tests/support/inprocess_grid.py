"""Re-export of :class:`simulations.inprocess_grid.InProcessGrid`, which benchmarks use too."""

from simulations.inprocess_grid import InProcessGrid

__all__ = ["InProcessGrid"]
