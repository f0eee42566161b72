"""The students a DGM implies: fresh, seeded PerturbedLMs sharing its embedding (DESIGN §2, §4).

:class:`StudentFactory` is a mixin: its host sets ``vocab_size``, ``prefix_len``,
``embed_dim``, ``latent_dim``, ``observations``, ``continuation``, ``embedding``
``(V, d)``, the teacher's family (``teacher_kind``, ``hidden``,
``transformer_config``) and the student defaults ``student_hidden`` (None: ``hidden``)
and ``student_init_scale``, so that the default student is well specified.
"""
from __future__ import annotations

import torch

from ..models import NETWORKS, PerturbedLM, TransformerConfig, make_network, make_perturbation
from ..validation import check_choice, check_int
from .teacher import transformer_config

__all__ = ["LEARNED_SCALE_MAPS", "StudentFactory"]

LEARNED_SCALE_MAPS = ("linear", "mlp", "mlp-conditional")  # the maps that take ``init_scale``


class StudentFactory:
    """``make_student``: a randomly initialised student of the teacher's family by default."""

    def make_student(self, *, network: str | None = None, hidden: int | None = None, perturbation: str = "linear",
                     latent_dim: int | None = None, transformer: TransformerConfig | dict | None = None,
                     init_scale: float | None = None, seed: int = 0, dtype: torch.dtype = torch.float64,
                     **perturbation_options) -> PerturbedLM:
        """A fresh, randomly initialised student sharing the embedding E (DESIGN §4).

        Defaults give a well-specified student: the teacher's family, the DGM's student
        width (``student_hidden``, by default the teacher's ``hidden``), the teacher's
        transformer size and q, a linear perturbation with A small and random
        (the DGM's ``student_init_scale``; never zero, DESIGN §2). Initialised from
        ``seed`` without touching torch's global generator.

        Parameters
        ----------
        network : "linear", "mlp" or "transformer"; None: the teacher's.
        hidden : MLP width; None: the DGM's ``student_hidden`` (itself None: the teacher's ``hidden``).
        perturbation : a name of :data:`simstudy.models.PERTURBATIONS`.
        latent_dim : q of the student's latent; None: the truth's.
        transformer : the transformer's size; None: the teacher's (or the default).
        init_scale : scale of the initial perturbation weights (linear and mlp maps); None: the DGM's
            ``student_init_scale``. An explicit value wins.
        seed : torch seed of the initialisation.
        dtype : the student's floating dtype.
        **perturbation_options : further keywords of the perturbation map (sigma, alpha, rho, ...).
        """
        kind = check_choice("network", self.teacher_kind if network is None else network, NETWORKS, word="unknown")
        if hidden is None:
            hidden = self.hidden if self.student_hidden is None else self.student_hidden
        hidden = check_int("hidden", hidden, 1)
        q = check_int("latent_dim", self.latent_dim if latent_dim is None else latent_dim, 1)
        if kind == "transformer":
            config = transformer_config(transformer if transformer is not None else self.transformer_config,
                                        prefix_len=self.prefix_len, observations=self.observations)
        else:
            config = None
        options = dict(perturbation_options)
        if perturbation in LEARNED_SCALE_MAPS:
            options["init_scale"] = self.student_init_scale if init_scale is None else init_scale
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(check_int("seed", seed, 0))
            net = make_network(kind, vocab_size=self.vocab_size, prefix_len=self.prefix_len,
                               embed_dim=self.embed_dim, hidden=hidden, transformer=config)
            pert = make_perturbation(perturbation, prefix_len=self.prefix_len, embed_dim=self.embed_dim,
                                     latent_dim=q, embedding=self.embedding, **options)
        student = PerturbedLM(embedding=self.embedding, network=net, perturbation=pert,
                              continuation=self.continuation)
        return student.to(dtype)
