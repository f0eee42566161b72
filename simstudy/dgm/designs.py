"""Reference designs of the perturbed next-token DGM, by name (DESIGN §3, §4).

Each entry holds the keyword arguments of :class:`~simstudy.dgm.PerturbedNextToken`
plus the design's sample size ``n`` (recorded in ``describe()``; ``sample`` takes
its own ``n``). ``PerturbedNextToken.reference(name, **overrides)`` builds one.

* ``weakly-identified`` (DESIGN §4): q = 1, a random direction, c = 1, n = 10000.
  Single-token data barely see the latent; the contrast in which learned
  perturbation cannot help.
* ``identified`` (DESIGN §4): q = 2, the tangent ("semantic jitter") direction,
  c = 2 conditionally iid observations, n = 5000 prefixes (the same token budget).
  The default for the extrapolation check.
* ``five-token`` (DESIGN §3): V = 5, L = 2, d = 3, q = 1 and a 4-unit tanh
  teacher, the small model in which the estimating equations' bias and
  efficiency are checked against exact quadrature. DESIGN §3 does not state its
  entropy, s_max or sigma; here entropy = 1.0 nats (2.0 exceeds log 5), s_max =
  0.5 (4 of the 5 tokens in support) and sigma = 0.6 as in the other designs.

Measured with this implementation (``describe()["kl_truth_teacher_id"]``, the mean
KL of the truth's marginal from the deterministic teacher over in-support
prefixes; DESIGN §4 reports 0.003, 0.019, 0.083 at sigma = 0.15, 0.3, 0.6 for the
weakly identified design): seed 0 gives 0.0010, 0.010, 0.067; the mean over seeds
0..15 is 0.0027, 0.024, 0.135 (standard errors 0.0004, 0.003, 0.015; teachers
vary a lot, 0.066 to 0.25 at sigma = 0.6). The identified design (seed 0) gives
0.083 at sigma = 0.6.
"""
from __future__ import annotations

_COMMON = dict(vocab_size=41, prefix_len=2, embed_dim=3, teacher="mlp", hidden=16, entropy=2.0, s_max=0.5,
               sigma=0.6, continuation="iid")

DESIGNS: dict[str, dict] = {
    "weakly-identified": dict(_COMMON, latent_dim=1, direction="random", observations=1, n=10_000),
    "identified": dict(_COMMON, latent_dim=2, direction="tangent", observations=2, n=5_000),
    "five-token": dict(vocab_size=5, prefix_len=2, embed_dim=3, teacher="mlp", hidden=4, entropy=1.0, s_max=0.5,
                       sigma=0.6, latent_dim=1, direction="random", observations=1, continuation="iid", n=None),
}
