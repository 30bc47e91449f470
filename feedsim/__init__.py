"""feedsim: a synthetic social network with known engagement probabilities (DESIGN.md §6)."""
from .world import DEFAULT_WORLD, World, WorldConfig
from .simulate import simulate
from stacker.dataset import read_table, write_table

__all__ = ["DEFAULT_WORLD", "World", "WorldConfig", "simulate", "read_table", "write_table"]
