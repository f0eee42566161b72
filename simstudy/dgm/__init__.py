"""Data-generating mechanisms with a known truth (DESIGN §4).

| module | concept |
| --- | --- |
| base | the interface every DGM offers (``DGM``), the ``Dataset`` it draws |
| registry | ``DGMS``, ``register_dgm``, ``make_dgm``, ``dgm_keywords``, ``dgm_defaults`` |
| perturbed_next_token | ``PerturbedNextToken``, the default DGM ("PNT") |
| designs | its reference designs by name |
| features, support, teacher, marginal, students | its parts: embedding features, prefix support, truth, |
| | exact marginal by quadrature, the students it implies |
"""
from .base import DGM, DGM_METHODS, Dataset
from .designs import DESIGNS
from .features import feature_names
from .perturbed_next_token import (DIRECTIONS, MARGINAL_RULES, TEACHER_LAWS, TEACHERS, PerturbedNextToken,
                                   smooth_features)
from .registry import DEFAULT_KIND, DGM_KEYS, DGMS, dgm_defaults, dgm_keywords, make_dgm, register_dgm

__all__ = ["DEFAULT_KIND", "DESIGNS", "DGM", "DGMS", "DGM_KEYS", "DGM_METHODS", "DIRECTIONS", "MARGINAL_RULES",
           "TEACHERS", "TEACHER_LAWS", "Dataset", "PerturbedNextToken", "dgm_defaults", "dgm_keywords", "feature_names",
           "make_dgm", "register_dgm", "smooth_features"]
