"""Decision Transformer research toolkit: training, merging, evaluation and analysis on offline MuJoCo data."""

__version__ = "0.1.0"
