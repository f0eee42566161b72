"""Models: perturbation maps G_phi, networks f_theta and the perturbed LM (DESIGN §2)."""
from .networks import (CONTINUATIONS, NETWORKS, LinearNetwork, MLPNetwork, Network, TransformerConfig,
                       TransformerNetwork, make_network)
from .perturbations import (PERTURBATIONS, DiscreteSubstitution, GaussianPerturbation, LinearPerturbation,
                            MLPPerturbation, NEFTunePerturbation, NoPerturbation, Perturbation, make_perturbation)
from .perturbed_lm import Marginal, PerturbedLM

__all__ = [
    "CONTINUATIONS", "NETWORKS", "PERTURBATIONS", "DiscreteSubstitution", "GaussianPerturbation",
    "LinearNetwork", "LinearPerturbation", "MLPNetwork", "MLPPerturbation", "Marginal", "NEFTunePerturbation",
    "Network", "NoPerturbation", "Perturbation", "PerturbedLM", "TransformerConfig", "TransformerNetwork",
    "make_network", "make_perturbation",
]
