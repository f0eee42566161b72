"""Data-generating mechanisms with a known truth (DESIGN §4)."""
from .designs import DESIGNS
from .perturbed_next_token import (DIRECTIONS, MARGINAL_RULES, TEACHERS, Dataset, PerturbedNextToken,
                                   smooth_features)

__all__ = ["DESIGNS", "DIRECTIONS", "MARGINAL_RULES", "TEACHERS", "Dataset", "PerturbedNextToken",
           "smooth_features"]
