"""Posterior-sampling equation ps-exact: exact posterior draws by rejection, DESIGN §3
(ps-mh, its Metropolis-Hastings sibling, is :mod:`simstudy.equations.posterior_mh`).

Both use g = grad log p(y | x, z) with z (approximately) drawn from the per-datum
posterior p(z | x, y) proportional to p(z) p(y | x, z), held fixed. By Fisher's
identity E_post grad log p(y | x, z) = grad log m(y | x), so exact posterior draws
give an unbiased estimating function of the likelihood equation.

Latent scope: per-datum only (DESIGN §2). Per-token posterior sampling would need a
forward pass per position and is not offered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..validation import check_choice, check_int, check_positive
from .base import Equation
from .proposal_scoring import SCORE_DTYPES, Float32Scorer
from .. import draws


FALLBACKS = ("none", "importance")  # what ps-exact does for a datum whose rejection budget runs out
_PACE = 4.0  # r remaining draws get r / (r + _PACE) * r / m_hat proposals per round
_SE_HIGH = 1.0  # m_hat is taken this many standard errors high


class RejectionBudgetExceeded(RuntimeError):
    """ps-exact made ``max_proposals`` proposals for a datum without collecting its draws.

    Raised instead of returning a biased gradient (dropping the datum or keeping an
    unfinished one would bias the estimating equation). Attributes: ``datum`` (row
    in the minibatch), ``proposals``, ``accepted``, ``log_m_estimate`` (the running
    estimate of log m(y | x), whose inverse is the expected number of proposals).
    """

    def __init__(self, message: str, *, datum: int, proposals: int, accepted: int, log_m_estimate: float):
        super().__init__(message)
        self.datum, self.proposals, self.accepted, self.log_m_estimate = datum, proposals, accepted, log_m_estimate


@dataclass
class PosteriorDraws:
    """Exact posterior draws of a minibatch (:meth:`PosteriorExact.sample_posterior`).

    ``latent`` ``(B, K, *latent_shape)``: row i holds ``accepted[i]`` iid posterior
    draws in its first slots (zeros after); ``accepted`` and ``proposals`` ``(B,)``
    long per datum; ``stats`` totals.
    """

    latent: torch.Tensor
    accepted: torch.Tensor
    proposals: torch.Tensor
    stats: dict


def _segment_cumsum(values: torch.Tensor, rows: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Inclusive cumulative sum within contiguous segments labelled by ``rows`` (sorted)."""
    total = torch.cumsum(values, 0)
    seg_sum = torch.zeros(num_segments, dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    before = torch.cumsum(seg_sum, 0) - seg_sum  # (num_segments,) sum of earlier segments
    return total - before[rows]


@dataclass
class PosteriorExact(Equation):
    """ps-exact: exact posterior draws by rejection (DESIGN §3).

    Propose z ~ prior with u ~ U(0, 1) and accept when log u < log p(y | x, z)
    (p <= 1, so the acceptance probability is p(y | x, z) and the overall acceptance
    rate of a datum is m(y | x): 1/m proposals per accepted draw on average; V at the
    truth on average over y for c = 1).

    Proposals are made in rounds, for all unfinished data at once (one forward
    pass over the ragged rows of a round, chunked at ``max_rows``). A datum's round
    size is set from its running Rao-Blackwellised estimate of m (the mean of
    p(y | x, z) over its proposals so far, taken one standard error high so that
    a noisy estimate errs towards one more round rather than wasted proposals):
    r remaining draws get ceil(r / (r + 4) * r / m_hat) proposals, at most
    ``growth`` times the proposals made so far; the first round proposes r. That
    keeps proposals made per accepted draw near 1/m (benchmark
    experiments/benchmarks/bench_ps_exact.py: 1.01 to 1.11 times E[1/m] on a V = 5
    and a V = 41 model) at the price of about 20 to 30 rounds per call.

    Every accepted draw of a datum is kept, up to ``num_draws`` (the first ones
    in proposal order), and the gradient is averaged over them: the stopping rule
    looks only at the accept indicators, so given the count the kept draws are iid
    posterior draws and g is unbiased.

    A datum that reaches ``max_proposals`` proposals without its draws raises
    :class:`RejectionBudgetExceeded` (never a silent bias; ``fallback="none"``, the
    strict variant and the default). Data of weight 0 are skipped.

    ``fallback="importance"`` lets ps-exact start from a random initialisation, where a
    few data have a tiny m(y | x) under the student (issue 11): such a datum gets one
    draw by importance resampling from all of its proposals instead (prior proposals
    weighted by p(y | x, z), kept as a streaming Gumbel-max pick per round, so it costs
    no extra forward pass). That draw is only approximately from the posterior, so the
    equation is then slightly biased; the fraction of data that fell back is returned
    in the stats (``fallback_fraction``; per fit, the mean over steps is the fraction of
    datum-visits) and must be reported beside the results.

    Numerics: the test log u < log p(y | x, z) and the running estimate of m stay in
    log space, so logits of +-1e4 are handled wherever acceptance is feasible (for
    example each prefix's most likely token, m of order one); where m is
    astronomically small (p ~ exp(-1e4)) rejection is infeasible and the budget
    error is raised.

    Parameters
    ----------
    num_draws : int >= 1
        Posterior draws per datum (K).
    max_proposals : int >= 1
        Budget of proposals per datum.
    growth : float > 1
        Largest factor by which a datum's proposals may grow in one round.
    max_rows : int >= 1
        Rows per forward pass (memory bound; a round may take several passes).
    fallback : {"none", "importance"}
        What happens when a datum's budget runs out: raise (strict) or one importance-resampled draw.
    score_dtype : {"model", "float32"}
        The dtype the proposals are scored in (:mod:`.proposal_scoring`): "float32" is about twice as fast
        on a CPU for float64 students and draws from the posterior of the float32 likelihood (its log
        differs by about 1e-6); the gradient pass keeps the model's dtype.
    """

    name = "ps-exact"
    audit_expectation = "unbiased"
    root_objective = "likelihood"
    estimand = "mean log m(y | x) (per-datum posterior, Fisher identity)"
    scopes = ("datum",)

    num_draws: int = 1
    max_proposals: int = 100_000
    growth: float = 4.0
    max_rows: int = 65_536
    fallback: str = "none"
    score_dtype: str = "model"
    scope: str = "datum"
    _scorer: Float32Scorer = field(default_factory=Float32Scorer, init=False, repr=False, compare=False)

    def validate(self):
        check_int("num_draws", self.num_draws, 1)
        check_int("max_proposals", self.max_proposals, 1)
        check_choice("fallback", self.fallback, FALLBACKS)
        check_choice("score_dtype", self.score_dtype, SCORE_DTYPES)
        if check_positive("growth", self.growth) <= 1:
            raise ValueError(f"growth={self.growth!r} is invalid; allowed: a number > 1")
        check_int("max_rows", self.max_rows, 1)
        super().validate()

    @torch.no_grad()
    def sample_posterior(self, model, x, y, *, generator=None, weights=None):
        """Exact posterior draws by batched rejection.

        Returns a :class:`PosteriorDraws`: row i of ``latent`` holds ``accepted[i]``
        iid posterior draws in its first slots (zeros after; all zero for data of
        weight 0), ``proposals[i]`` the proposals made for it.
        """
        B, K = x.shape[0], self.num_draws
        device = x.device
        scorer = model
        if self.score_dtype == "float32" and model.dtype != torch.float32:
            scorer = self._scorer(model)
        todo = torch.ones(B, dtype=torch.bool, device=device) if weights is None else weights > 0
        proposals = torch.zeros(B, dtype=torch.long, device=device)
        accepted = torch.zeros(B, dtype=torch.long, device=device)
        log_sum_p = torch.full((B,), -math.inf, dtype=torch.float64, device=device)  # log sum of p over proposals
        log_sum_p2 = torch.full((B,), -math.inf, dtype=torch.float64, device=device)  # log sum of p^2
        kept = None
        rounds = 0
        resample = self.fallback == "importance"
        fell_back = torch.zeros(B, dtype=torch.bool, device=device)
        candidate, log_mass = None, torch.full((B,), -math.inf, dtype=torch.float64, device=device)
        while bool(todo.any()):
            rounds += 1
            ids = todo.nonzero().squeeze(1)  # (b,)
            r = (K - accepted[ids]).double()  # remaining draws
            n_made = proposals[ids].double()
            m_hat = self._m_upper(log_sum_p[ids], log_sum_p2[ids], n_made)
            size = torch.ceil(r / (r + _PACE) * r / m_hat.clamp_min(1e-300))
            size = torch.minimum(size, self.growth * n_made.clamp_min(1))
            size = torch.where(n_made == 0, r, size)
            size = torch.minimum(size.clamp_min(1), (self.max_proposals - n_made)).to(torch.long)  # (b,)
            rows = torch.repeat_interleave(ids, size)  # (N,) sorted datum ids
            z = model.sample_latent(x[rows], 1, generator)  # (N, 1, *latent_shape)
            z_scored = z.float() if scorer is not model else z
            logp = torch.cat([scorer.log_lik(x[rows[s:s + self.max_rows]], y[rows[s:s + self.max_rows]],
                                             z_scored[s:s + self.max_rows])[:, 0]
                              for s in range(0, rows.shape[0], self.max_rows)]).to(z.dtype)  # (N,)
            if kept is None:
                kept = z.new_zeros((B, K, *z.shape[2:]))  # (B, K, *latent_shape)
            log_u = draws.rand(rows.shape[0], generator=generator, dtype=logp.dtype, device=device).log()
            acc = log_u < logp  # (N,)
            # Rao-Blackwellised running estimate of m, in log space
            shift = torch.full((B,), -math.inf, dtype=logp.dtype, device=device).scatter_reduce(
                0, rows, logp, reduce="amax")
            shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
            centred = logp - shift[rows]  # (N,) <= 0
            part = torch.zeros(B, dtype=logp.dtype, device=device).index_add_(0, rows, centred.exp())
            part2 = torch.zeros(B, dtype=logp.dtype, device=device).index_add_(0, rows, (2 * centred).exp())
            log_sum_p = torch.logaddexp(log_sum_p, (part.log() + shift).double())
            log_sum_p2 = torch.logaddexp(log_sum_p2, (part2.log() + 2 * shift).double())
            # keep the first r accepted draws of each datum, in proposal order
            rank = _segment_cumsum(acc.long(), rows, B)  # (N,) 1-based rank among accepted
            take = acc & (rank <= (K - accepted)[rows])
            slot = (accepted[rows] + rank - 1)[take]
            kept[rows[take], slot] = z[take, 0]
            accepted += torch.zeros(B, dtype=torch.long, device=device).index_add_(0, rows, take.long())
            proposals += torch.zeros(B, dtype=torch.long, device=device).index_add_(0, rows, torch.ones_like(rows))
            if resample:
                candidate, log_mass = self._resample_round(candidate, log_mass, z[:, 0], logp, rows, B, generator)
            todo = todo & (accepted < K)
            over = todo & (proposals >= self.max_proposals)
            if resample and bool(over.any()):  # one importance-resampled draw from every proposal so far
                ids_over = (over & torch.isfinite(log_mass)).nonzero().squeeze(1)
                kept[ids_over, accepted[ids_over]] = candidate[ids_over]
                accepted[ids_over] += 1
                fell_back[ids_over] = True
                todo = todo & ~fell_back
                over = todo & (proposals >= self.max_proposals)
            if bool(over.any()):
                i = int(over.nonzero()[0, 0])
                log_m = float(log_sum_p[i] - math.log(max(int(proposals[i]), 1)))
                raise RejectionBudgetExceeded(
                    f"ps-exact: datum {i} got {int(accepted[i])} of {K} posterior draws in max_proposals="
                    f"{self.max_proposals} proposals (estimated log m = {log_m:.4g}, so about "
                    f"10^{(math.log(K) - log_m) / math.log(10):.1f} are needed); raise max_proposals or use "
                    f"another equation",
                    datum=i, proposals=int(proposals[i]), accepted=int(accepted[i]), log_m_estimate=log_m)
        if kept is None:
            kept = model.sample_latent(x, K, generator).zero_()
        done = accepted > 0
        n_data = max(int(done.sum()), 1)
        stats = {"proposals": float(proposals.sum()), "accepted": float(accepted.sum()), "rounds": float(rounds),
                 "acceptance_rate": float(accepted.sum()) / max(float(proposals.sum()), 1.0),
                 "proposals_per_accepted": float(proposals.sum()) / max(float(accepted.sum()), 1.0),
                 "max_proposals_datum": float(proposals.max()), "data_sampled": float(n_data),
                 "fallback": float(fell_back.sum()), "fallback_fraction": float(fell_back.sum()) / n_data}
        return PosteriorDraws(latent=kept, accepted=accepted, proposals=proposals, stats=stats)

    @staticmethod
    def _resample_round(candidate, log_mass, z, logp, rows, B, generator):
        """Streaming importance resampling over all proposals of each datum (prior proposals, weights
        p(y | x, z)): this round's Gumbel-max pick replaces the datum's candidate with probability
        (this round's mass) / (all mass so far). ``z`` ``(N, *latent_shape)``, ``logp`` ``(N,)``;
        returns the updated ``(candidate (B, *latent_shape), log_mass (B,))``."""
        if candidate is None:
            candidate = z.new_zeros((B, *z.shape[1:]))
        gumbel = -(-draws.rand(rows.shape[0], generator=generator, dtype=logp.dtype, device=z.device).log()).log()
        key = logp + gumbel  # (N,)
        best = torch.full((B,), -math.inf, dtype=key.dtype, device=z.device).scatter_reduce(0, rows, key, "amax")
        top = (key == best[rows]) & torch.isfinite(key)  # (N,) one winner per datum (ties have probability 0)
        pick = torch.zeros(B, dtype=torch.long, device=z.device).scatter_(0, rows[top], top.nonzero().squeeze(1))
        round_mass = torch.full((B,), -math.inf, dtype=torch.float64, device=z.device).scatter_reduce(
            0, rows, logp.double(), "amax")
        shift = torch.where(torch.isfinite(round_mass), round_mass, torch.zeros_like(round_mass))
        part = torch.zeros(B, dtype=torch.float64, device=z.device).index_add_(0, rows, (logp.double() - shift[rows]).exp())
        round_mass = part.log() + shift  # (B,) log of this round's summed weights
        total = torch.logaddexp(log_mass, round_mass)
        u = draws.rand(B, generator=generator, dtype=torch.float64, device=z.device)
        seen = torch.zeros(B, dtype=torch.bool, device=z.device)
        seen[rows] = True
        swap = seen & torch.isfinite(round_mass) & (u.log() < round_mass - total)
        candidate = torch.where(swap.view(B, *([1] * (z.dim() - 1))), z[pick], candidate)
        return candidate, torch.where(seen, total, log_mass)

    @staticmethod
    def _m_upper(log_sum_p, log_sum_p2, n):
        """Running estimate of m, one standard error high: m_hat + se (RB mean of p over
        the proposals so far). Erring high makes a round too small (one more round) rather
        than too large (wasted proposals)."""
        n = n.clamp_min(1)
        mean = (log_sum_p - n.log()).exp()
        second = (log_sum_p2 - n.log()).exp()
        se = ((second - mean ** 2).clamp_min(0) / n).sqrt()
        return mean + _SE_HIGH * se

    def per_datum_loss(self, model, x, y, *, weights, generator, index):
        draws = self.sample_posterior(model, x, y, generator=generator, weights=weights)
        kept, accepted, stats = draws.latent, draws.accepted, draws.stats
        ids = (accepted > 0).nonzero().squeeze(1)  # data with draws
        counts = accepted[ids]
        rows = torch.repeat_interleave(ids, counts)  # (N,)
        starts = (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)  # (N,)
        slot = torch.arange(rows.shape[0], device=x.device) - starts
        ll = model.log_lik(x[rows], y[rows], kept[rows, slot][:, None])[:, 0]  # (N,) one gradient pass
        per = torch.zeros(x.shape[0], dtype=ll.dtype, device=x.device).index_add(
            0, rows, ll / counts.repeat_interleave(counts).to(ll.dtype))  # (B,) mean over kept draws
        return -per, stats
