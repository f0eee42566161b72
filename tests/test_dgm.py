"""Tests of the perturbed next-token DGM (DESIGN §4).

Statistical tests use fixed seeds. Goodness of fit is Pearson's chi-square at
alpha = 0.001 per test (cells with expected count < 5 pooled); Monte Carlo
comparisons use 4 standard errors. Each statistical test is paired with a
power check where the wrong answer is close enough to be a real risk.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from simstudy.dgm import DESIGNS, Dataset, PerturbedNextToken, smooth_features
from simstudy.models import LinearPerturbation, MLPNetwork, TransformerConfig

ALPHA = 0.001
SMALL = dict(vocab_size=7, prefix_len=2, embed_dim=3, latent_dim=1, teacher="mlp", hidden=8, entropy=1.2,
             s_max=0.5, sigma=0.6)


def small(**overrides) -> PerturbedNextToken:
    return PerturbedNextToken(**{**SMALL, "seed": 1, **overrides})


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson goodness of fit of counts to probs; cells with expected < 5 pooled."""
    counts, probs = np.asarray(counts, float).ravel(), np.asarray(probs, float).ravel()
    expected = counts.sum() * probs / probs.sum()
    order = np.argsort(expected)
    e_sorted, o_sorted = expected[order], counts[order]
    k = 0  # pool the smallest cells until the pooled cell has expected >= 5
    while k < len(e_sorted) and e_sorted[:k].sum() < 5:
        k += 1
    if k > 1:
        e_cells = np.concatenate([[e_sorted[:k].sum()], e_sorted[k:]])
        o_cells = np.concatenate([[o_sorted[:k].sum()], o_sorted[k:]])
    else:
        e_cells, o_cells = e_sorted, o_sorted
    statistic = np.sum((o_cells - e_cells) ** 2 / e_cells)
    return float(stats.chi2.sf(statistic, len(e_cells) - 1))


# ---- construction, prefixes, directions --------------------------------------------------------
def test_prefix_sets_and_distance_enumerated():
    dgm = PerturbedNextToken.reference("weakly-identified")
    s = dgm.coordinates
    assert np.allclose(s, np.linspace(-1, 1, 41))
    assert len(dgm.tokens_in_support) == 31  # s_v <= 0.5: v = 0..30
    inside, oos, all_ = dgm.prefixes("in"), dgm.prefixes("oos"), dgm.prefixes("all")
    assert len(all_) == 41**2 and len(inside) == 31**2 and len(oos) == 41**2 - 31**2
    assert np.array_equal(dgm.prefix_index(all_), np.arange(41**2))  # lexicographic order
    assert dgm.in_support(inside).all() and not dgm.in_support(oos).any()
    assert np.all(dgm.distance(inside) == 0)
    d_oos = dgm.distance(oos)
    assert np.all(d_oos > 0)
    expected = np.maximum(s[oos] - 0.5, 0).max(1)
    assert np.allclose(d_oos, expected)
    assert np.isclose(d_oos.max(), 0.5)  # token 40 (s = 1) is 0.5 beyond s_max
    assert np.isclose(dgm.distance([[0, 31]])[0], s[31] - 0.5)


def test_prefix_sets_sampled_when_too_many():
    dgm = small(vocab_size=9, prefix_len=3, max_enumerate=100, num_prefix_samples=200)
    assert not dgm.prefixes_enumerated
    inside, oos, all_ = dgm.prefixes("in"), dgm.prefixes("oos"), dgm.prefixes("all")
    assert 0 < len(inside) <= 200 and 0 < len(oos) <= 200
    assert dgm.in_support(inside).all() and not dgm.in_support(oos).any()
    assert len(all_) == len(inside) + len(oos)
    assert len(np.unique(all_, axis=0)) == len(all_)
    again = small(vocab_size=9, prefix_len=3, max_enumerate=100, num_prefix_samples=200)
    assert np.array_equal(again.prefixes("oos"), oos)  # fixed by the seed
    m = dgm.exact_marginal(oos[:5])  # uncached path
    assert np.allclose(m.sum(1), 1, atol=1e-10)


def test_embedding_is_smooth_features_plus_fixed_noise():
    a, b = small(), small()
    noiseless = small(embed_noise=0.0)
    s = np.linspace(-1, 1, 7)
    phi = np.stack([s, s**2, np.sin(np.pi * s)], axis=1)
    assert np.allclose(noiseless.embedding.numpy(), phi)
    assert torch.equal(a.embedding, b.embedding) and a.embedding.dtype == torch.float64
    noise = (a.embedding.numpy() - phi) / 0.1
    assert 0.3 < noise.std() < 2.0
    assert not torch.equal(a.embedding, small(seed=2).embedding)
    feats = smooth_features(s, 7)  # s, s^2, sin, cos, s^3, sin 2 pi s, cos 2 pi s
    assert np.allclose(feats[:, 3], np.cos(np.pi * s)) and np.allclose(feats[:, 6], np.cos(2 * np.pi * s))
    h = 1e-6
    num = (smooth_features(0.3 + h, 7) - smooth_features(0.3 - h, 7)) / (2 * h)
    assert np.allclose(smooth_features(0.3, 7, derivative=True), num, atol=1e-6)


def test_construction_is_seeded_and_leaves_torch_global_rng_alone():
    state = torch.get_rng_state()
    a = small(teacher="transformer", transformer=dict(n_layer=1, n_head=2, n_embd=8))
    b = small(teacher="transformer", transformer=dict(n_layer=1, n_head=2, n_embd=8))
    a.make_student(seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for pa, pb in zip(a.teacher.parameters(), b.teacher.parameters()):
        assert torch.equal(pa, pb)
    c = small(seed=5)
    assert not torch.equal(small().A_star, c.A_star)


@pytest.mark.parametrize("q, L", [(2, 2), (1, 2), (3, 2), (2, 3)])
def test_tangent_direction(q, L):
    dgm = small(latent_dim=q, prefix_len=L, direction="tangent", sigma=0.7)
    A = dgm.A_star.numpy()  # (L*d, q)
    d = dgm.embed_dim
    assert A.shape == (L * d, q)
    assert np.isclose(np.linalg.norm(A), 0.7, rtol=1e-12)
    h = 1e-6  # the unit tangent of the smooth embedding at s_max, by finite differences
    t = (smooth_features(0.5 + h, d) - smooth_features(0.5 - h, d)) / (2 * h)
    t /= np.linalg.norm(t)
    for pos in range(L):
        for j in range(q):
            block = A[pos * d:(pos + 1) * d, j]
            drives = (j == pos % q) if q <= L else (pos == j % L)
            if drives:
                assert np.allclose(block / np.linalg.norm(block), t, atol=1e-8)
            else:
                assert np.all(block == 0)
    # each position moves along the tangent: the perturbed embedding of position l is E + t * (a scalar)
    assert all(np.any(A[pos * d:(pos + 1) * d] != 0) for pos in range(L))


def test_random_direction_and_sigma_zero():
    dgm = small(latent_dim=3)
    assert np.isclose(float(dgm.A_star.norm()), 0.6, rtol=1e-12)
    assert isinstance(dgm.teacher.perturbation, LinearPerturbation)
    assert not any(p.requires_grad for p in dgm.teacher.parameters())
    flat = small(latent_dim=3, sigma=0.0)
    assert float(flat.A_star.abs().max()) == 0.0
    x = flat.prefixes("all")
    assert np.allclose(flat.exact_marginal(x), flat.teacher_probs(x), atol=1e-12)
    # sigma changes only A*: the deterministic teacher is the same network
    assert np.allclose(flat.teacher_probs(x), dgm.teacher_probs(x), atol=1e-14)


@pytest.mark.parametrize("teacher", ["linear", "mlp", "transformer"])
def test_entropy_bisection_hits_target(teacher):
    dgm = small(teacher=teacher, entropy=1.3, transformer=dict(n_layer=1, n_head=2, n_embd=16))
    x = torch.as_tensor(dgm.prefixes("in"))
    logp = dgm.teacher.log_probs(x, None, None)[:, 0, 0]  # (N, V), z = 0
    entropy = float(-(logp.exp() * logp).sum(-1).mean())
    assert abs(entropy - 1.3) < 1e-6
    assert abs(dgm.teacher_entropy - 1.3) < 1e-6
    assert float(dgm.teacher.network.logit_scale) == pytest.approx(dgm.logit_scale)


def test_mlp_teacher_is_nonlinear_on_the_embedding_range():
    dgm = PerturbedNextToken.reference("weakly-identified")
    net = dgm.teacher.network
    windows = dgm.embedding[torch.as_tensor(dgm.prefixes("all"))].reshape(-1, 6)
    pre = windows @ net.hidden.weight.T + net.hidden.bias  # (N, H)
    sd = pre.std(0)
    assert torch.allclose(sd, torch.full_like(sd, 2.0), rtol=0.05)  # steepness 2 (population sd)
    saturated = (pre.abs() > 1.5).double().mean(0)  # each unit bends inside the range
    linear_part = (pre.abs() < 0.5).double().mean(0)
    assert float(saturated.mean()) > 0.2 and float(linear_part.mean()) > 0.05


# ---- the exact marginal ---------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [dict(), dict(latent_dim=2, direction="tangent"), dict(latent_dim=4),
                                       dict(teacher="linear", latent_dim=2)])
def test_marginals_sum_to_one(overrides):
    dgm = small(**overrides)
    x = dgm.prefixes("all")[::3]
    m, err = dgm.exact_marginal(x, return_error=True)
    assert m.shape == (len(x), 7) and err.shape == m.shape
    assert np.all(m >= 0) and np.all(err > 0)
    assert np.abs(m.sum(1) - 1).max() < 1e-10


@pytest.mark.parametrize("q, rule, num_nodes", [(1, "trapezoid", 201), (1, "trapezoid", 41), (2, "trapezoid", 31),
                                                (2, "trapezoid", 61), (1, "gauss-hermite", 40),
                                                (2, "gauss-hermite", 20)])
def test_doubling_nodes_stays_within_reported_error(q, rule, num_nodes):
    dgm = small(latent_dim=q, sigma=0.8, direction="tangent" if q == 2 else "random")
    x = dgm.prefixes("all")[::2]
    m, err = dgm.exact_marginal(x, rule=rule, num_nodes=num_nodes, return_error=True)
    doubled = 2 * num_nodes - 1 if rule == "trapezoid" else 2 * num_nodes
    m2 = dgm.exact_marginal(x, rule=rule, num_nodes=doubled)
    assert np.all(np.abs(m2 - m) <= err)
    # the reference rule (the more accurate trapezoid) is also within the bound
    ref = dgm.exact_marginal(x, num_nodes=2 * (201 if q == 1 else 61))
    assert np.all(np.abs(ref - m) <= err)


def test_default_error_levels_are_small():
    dgm = small(latent_dim=2, direction="tangent")
    _, err = dgm.exact_marginal(dgm.prefixes("all"), return_error=True)
    assert err.max() < 1e-5  # a conservative bound; the change from doubling is far smaller
    dgm1 = small()
    _, err1 = dgm1.exact_marginal(dgm1.prefixes("all"), return_error=True)
    assert err1.max() < 1e-12


def test_trapezoid_and_gauss_hermite_agree_within_their_errors():
    dgm = small(sigma=0.3, teacher="linear")  # a smooth integrand
    x = dgm.prefixes("all")
    mt, et = dgm.exact_marginal(x, rule="trapezoid", return_error=True)
    mg, eg = dgm.exact_marginal(x, rule="gauss-hermite", return_error=True)
    assert np.all(np.abs(mt - mg) <= et + eg)
    assert eg.max() < 1e-8


def test_refined_trapezoid_halves_the_step_on_the_same_interval():
    from simstudy import quadrature

    for half_width in (9.0, 4.0):
        coarse = quadrature.trapezoid(11, 1, half_width=half_width)
        fine = quadrature.refined(coarse)
        assert fine.size == 21 and fine.half_width == half_width
        assert np.isclose(np.abs(fine.nodes).max(), half_width)
        assert np.allclose(fine.nodes[::2], coarse.nodes)   # the coarse grid is every other fine node


def test_marginal_cache_and_batch_independence():
    dgm = small(latent_dim=2)
    x = dgm.prefixes("oos")
    first = dgm.exact_marginal(x[::-1][:6])
    fresh = small(latent_dim=2)
    full = fresh.exact_marginal(x)
    assert np.allclose(first, full[::-1][:6], rtol=0, atol=1e-14)
    assert np.array_equal(dgm.exact_marginal(x[::-1][:6]), first)


def test_exact_marginal_agrees_with_the_models_own_quadrature():
    dgm = small(latent_dim=2, sigma=0.8)  # an independent code path: PerturbedLM.marginal
    x = dgm.prefixes("all")[::6]
    m, err = dgm.exact_marginal(x, return_error=True)
    other = dgm.teacher.marginal(torch.as_tensor(x), method="quadrature", num_nodes=31)
    assert np.all(np.abs(m - other.probs) <= err + other.error)


def test_exact_log_likelihood_matches_marginal_for_one_token():
    dgm = small(latent_dim=2)
    x = dgm.prefixes("all")[::5]
    y = np.arange(len(x)) % 7
    m = dgm.exact_marginal(x)
    ll = dgm.exact_log_likelihood(x, y[:, None])
    assert np.allclose(np.exp(ll), m[np.arange(len(x)), y], rtol=1e-10)


def test_rqmc_for_q4_agrees_with_large_monte_carlo():
    dgm = small(latent_dim=4, sigma=0.8)
    x = np.concatenate([dgm.prefixes("in")[[0, 10]], dgm.prefixes("oos")[[3]]])
    m, se = dgm.exact_marginal(x, return_error=True)
    assert np.all(se > 0) and se.max() < 1e-3
    assert np.abs(m.sum(1) - 1).max() < 1e-10
    mc = dgm.teacher.marginal(torch.as_tensor(x), method="mc", num_draws=200_000,
                              generator=torch.Generator().manual_seed(11))
    z = np.abs(m - mc.probs) / np.sqrt(se**2 + mc.error**2)
    assert z.max() < 4
    with pytest.raises(ValueError, match="rule='trapezoid'"):
        dgm.exact_marginal(x, rule="trapezoid")


def test_rqmc_standard_error_is_honest_against_quadrature():
    dgm = small(latent_dim=2, sigma=0.8)
    x = dgm.prefixes("all")[::4]
    exact = dgm.exact_marginal(x)
    m, se = dgm.exact_marginal(x, rule="rqmc", num_nodes=256, return_error=True)
    z = (m - exact) / se
    assert np.abs(z).max() < 6  # t with 15 df over ~80 entries
    assert 0.3 < np.sqrt(np.mean(z**2)) < 2.0  # the SE is the right size, not merely conservative


# ---- sampling ---------------------------------------------------------------------------------------
def test_sample_shapes_reproducibility_and_rng_order():
    dgm = small(latent_dim=2, observations=3)
    data = dgm.sample(500, np.random.default_rng(7))
    assert isinstance(data, Dataset) and len(data) == 500 and data.observations == 3
    assert data.x.shape == (500, 2) and data.y.shape == (500, 3) and data.z.shape == (500, 2)
    assert data.x.dtype == np.int64 and data.y.dtype == np.int64 and data.z.dtype == np.float64
    assert dgm.in_support(data.x).all()
    assert data.y.min() >= 0 and data.y.max() < 7
    again = dgm.sample(500, np.random.default_rng(7))
    assert np.array_equal(again.x, data.x) and np.array_equal(again.y, data.y) and np.array_equal(again.z, data.z)
    other = dgm.sample(500, np.random.default_rng(8))
    assert not np.array_equal(other.y, data.y)
    rng = np.random.default_rng(7)  # documented order: prefixes, then z, then uniforms
    rng.integers(0, len(dgm.tokens_in_support), (500, 2))
    assert np.array_equal(rng.standard_normal((500, 2)), data.z)
    x, y = data.tensors()
    assert x.dtype == torch.long and y.dtype == torch.long and torch.equal(y, torch.as_tensor(data.y))
    part = data.subset(slice(0, 10))
    assert len(part) == 10 and np.array_equal(part.y, data.y[:10])


def test_training_prefixes_are_uniform_over_the_support():
    dgm = small()
    data = dgm.sample(30_000, np.random.default_rng(3))
    inside = dgm.prefixes("in")
    counts = np.bincount(dgm.prefix_index(data.x), minlength=49)[dgm.prefix_index(inside)]
    assert counts.sum() == 30_000
    assert chi_square_pvalue(counts, np.full(len(inside), 1 / len(inside))) > ALPHA


def _gof_prefixes(dgm):
    return np.array([dgm.prefixes("in")[5], dgm.prefixes("in")[14], dgm.prefixes("oos")[7]])


def test_sampler_frequencies_agree_with_exact_marginal():
    dgm = small(sigma=1.0)
    rng = np.random.default_rng(2024)
    for prefix in _gof_prefixes(dgm):
        data = dgm.sample(20_000, rng, prefixes=np.repeat(prefix[None], 20_000, axis=0))
        counts = np.bincount(data.y[:, 0], minlength=7)
        assert chi_square_pvalue(counts, dgm.exact_marginal(prefix[None])[0]) > ALPHA


def test_chi_square_rejects_the_unperturbed_marginal():
    dgm, flat = small(sigma=1.0), small(sigma=0.0)
    rng = np.random.default_rng(2024)
    for prefix in _gof_prefixes(dgm):
        m, p0 = dgm.exact_marginal(prefix[None])[0], flat.exact_marginal(prefix[None])[0]
        assert np.sum(m * np.log(m / p0)) > 0.005  # the two truths differ here
        data = dgm.sample(20_000, rng, prefixes=np.repeat(prefix[None], 20_000, axis=0))
        counts = np.bincount(data.y[:, 0], minlength=7)
        assert chi_square_pvalue(counts, p0) < ALPHA


@pytest.mark.parametrize("continuation", ["iid", "autoregressive"])
def test_joint_observations_share_the_latent(continuation):
    dgm = small(vocab_size=5, entropy=1.0, sigma=1.5, observations=2, continuation=continuation)
    prefix = dgm.prefixes("in")[5]
    n = 20_000
    data = dgm.sample(n, np.random.default_rng(99), prefixes=np.repeat(prefix[None], n, axis=0))
    pairs = np.stack(np.meshgrid(np.arange(5), np.arange(5), indexing="ij"), -1).reshape(-1, 2)  # (25, 2)
    joint = np.exp(dgm.exact_log_likelihood(np.repeat(prefix[None], 25, axis=0), pairs))
    assert abs(joint.sum() - 1) < 1e-10
    counts = np.bincount(data.y[:, 0] * 5 + data.y[:, 1], minlength=25)
    assert chi_square_pvalue(counts, joint) > ALPHA
    # power: the product of the marginals (independent observations, no shared latent) is rejected
    if continuation == "iid":
        m = dgm.exact_marginal(prefix[None])[0]
        independent = np.outer(m, m).ravel()
    else:  # the other continuation mode
        other = small(vocab_size=5, entropy=1.0, sigma=1.5, observations=2, continuation="iid")
        independent = np.exp(other.exact_log_likelihood(np.repeat(prefix[None], 25, axis=0), pairs))
    assert chi_square_pvalue(counts, independent) < ALPHA


def test_sample_sequences_is_a_markov_chain_with_the_marginal_as_transition():
    dgm = small(vocab_size=5, entropy=1.0, sigma=1.5)
    n, length = 3000, 12
    seq = dgm.sample_sequences(n, length, np.random.default_rng(5))
    assert seq.shape == (n, 2 + length) and seq.dtype == np.int64
    assert dgm.in_support(seq[:, :2]).all()
    assert np.array_equal(seq, dgm.sample_sequences(n, length, np.random.default_rng(5)))
    windows = np.stack([seq[:, t:t + 2] for t in range(length)], 1).reshape(-1, 2)  # (n*length, 2)
    nxt = seq[:, 2:].reshape(-1)
    idx = dgm.prefix_index(windows)
    m = dgm.exact_marginal(dgm.prefixes("all"))  # (25, 5): the transition of the chain
    statistic, df = 0.0, 0
    for w in np.unique(idx):  # pooled Pearson statistic over the windows the chain visited
        counts = np.bincount(nxt[idx == w], minlength=5)
        if counts.sum() < 100:
            continue
        expected = counts.sum() * m[w]
        statistic += np.sum((counts - expected) ** 2 / expected)
        df += 4
    assert df >= 40
    assert stats.chi2.sf(statistic, df) > ALPHA
    # a fixed start: the first generated token follows m*(. | start)
    start = np.repeat(dgm.prefixes("in")[3][None], 20_000, axis=0)
    first = dgm.sample_sequences(20_000, 1, np.random.default_rng(6), start=start)[:, 2]
    assert chi_square_pvalue(np.bincount(first, minlength=5), m[dgm.prefix_index(start[:1])[0]]) > ALPHA


# ---- students, designs, describe -----------------------------------------------------------------
def test_make_student_is_well_specified_by_default():
    dgm = PerturbedNextToken.reference("identified")
    student = dgm.make_student(seed=4)
    assert isinstance(student.network, MLPNetwork) and student.network.hidden.out_features == 16
    assert isinstance(student.perturbation, LinearPerturbation) and student.perturbation.A.shape == (6, 2)
    assert torch.equal(student.embedding, dgm.embedding) and student.dtype == torch.float64
    assert 0 < float(student.perturbation.A.detach().abs().max()) < 0.5
    assert student.continuation == "iid"
    again = dgm.make_student(seed=4)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), again.parameters()))
    assert not torch.equal(dgm.make_student(seed=5).perturbation.A, student.perturbation.A)
    gauss = dgm.make_student(perturbation="gaussian", sigma=0.3, hidden=32)
    assert gauss.perturbation.sigma == 0.3 and gauss.network.hidden.out_features == 32
    tr = dgm.make_student(network="transformer", transformer=dict(n_layer=1, n_head=2, n_embd=16))
    x, y = dgm.sample(4, np.random.default_rng(0)).tensors()
    assert tr.log_lik(x, y, tr.sample_latent(x, 3)).shape == (4, 3)


def test_reference_designs():
    weak = PerturbedNextToken.reference("weakly-identified")
    ident = PerturbedNextToken.reference("identified", seed=3)
    five = PerturbedNextToken.reference("five-token")
    for dgm in (weak, ident):
        assert (dgm.vocab_size, dgm.embed_dim, dgm.prefix_len, dgm.hidden, dgm.entropy, dgm.s_max) == (
            41, 3, 2, 16, 2.0, 0.5)
        assert dgm.teacher_kind == "mlp" and dgm.sigma == 0.6
    assert (weak.latent_dim, weak.direction, weak.observations, weak.n) == (1, "random", 1, 10_000)
    assert (ident.latent_dim, ident.direction, ident.observations, ident.continuation, ident.n) == (
        2, "tangent", 2, "iid", 5_000)
    assert (five.vocab_size, five.prefix_len, five.embed_dim, five.latent_dim, five.hidden) == (5, 2, 3, 1, 4)
    assert ident.seed == 3 and ident.describe(exact=False)["design"] == "identified"
    assert PerturbedNextToken.reference("weakly-identified", sigma=0.3).sigma == 0.3
    assert set(DESIGNS) == {"weakly-identified", "identified", "five-token"}


def test_truth_moves_away_from_the_teacher_as_sigma_grows():
    kls = [PerturbedNextToken.reference("weakly-identified", sigma=s).describe()["kl_truth_teacher_id"]
           for s in (0.0, 0.02, 0.04, 0.15, 0.3, 0.6)]
    assert abs(kls[0]) < 1e-12
    assert all(0 < a < b for a, b in zip(kls[1:], kls[2:]))
    # z -> -z symmetry: m* - p0 = O(sigma^2), so KL(m* || p0) = O(sigma^4) for small sigma
    assert 15 < kls[2] / kls[1] < 17


def test_describe_is_flat():
    dgm = small(latent_dim=2, observations=2, direction="tangent")
    info = dgm.describe()
    assert all(isinstance(v, (bool, int, float, str, type(None))) for v in info.values())
    assert info["num_prefixes_in"] + info["num_prefixes_oos"] == 49
    assert info["num_prefixes_in"] == 5**2 and info["tokens_in_support"] == 5  # s = -1, -2/3, ..., 1
    assert abs(info["entropy_teacher_id"] - 1.2) < 1e-6
    assert info["kl_truth_teacher_id"] > 0 and info["quadrature_max_error_id"] < 1e-5
    assert math.isclose(info["a_star_norm"], 0.6, rel_tol=1e-12)
    quick = dgm.describe(exact=False)
    assert "kl_truth_teacher_id" not in quick and quick["latent_dim"] == 2
    tr = small(teacher="transformer", transformer=TransformerConfig(n_layer=1, n_head=2, n_embd=8)).describe(exact=False)
    assert tr["transformer_n_embd"] == 8 and tr["hidden"] is None
    assert all(isinstance(v, (bool, int, float, str, type(None))) for v in tr.values())


# ---- validation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=1), "vocab_size=1"),
    (dict(vocab_size=7.0), "vocab_size=7.0"),
    (dict(latent_dim=0), "latent_dim=0"),
    (dict(prefix_len=0), "prefix_len=0"),
    (dict(embed_dim=0), "embed_dim=0"),
    (dict(hidden=0), "hidden=0"),
    (dict(s_max=1.0), "s_max=1.0"),
    (dict(s_max=-1.5), "s_max=-1.5"),
    (dict(teacher="rnn"), "teacher='rnn'"),
    (dict(direction="up"), "direction='up'"),
    (dict(continuation="markov"), "continuation='markov'"),
    (dict(observations=0), "observations=0"),
    (dict(entropy=0.0), "entropy=0.0"),
    (dict(entropy=math.log(7)), "entropy="),
    (dict(entropy=float("nan")), "entropy=nan"),
    (dict(sigma=-0.1), "sigma=-0.1"),
    (dict(embed_noise=-1.0), "embed_noise=-1.0"),
    (dict(seed=-1), "seed=-1"),
    (dict(n=0), "n=0"),
    (dict(teacher="transformer", observations=4, transformer=dict(max_len=3)), "max_len=3"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        small(**kwargs)
    assert "allowed" in str(info.value)


def test_invalid_calls():
    dgm = small()
    rng = np.random.default_rng(0)
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"n={n}.*allowed"):
            dgm.sample(n, rng)
    with pytest.raises(ValueError, match="rng=.*allowed"):
        dgm.sample(10, 0)
    with pytest.raises(ValueError, match="length=0.*allowed"):
        dgm.sample_sequences(10, 0, rng)
    with pytest.raises(ValueError, match="prefixes has 3 rows"):
        dgm.sample(10, rng, prefixes=np.zeros((3, 2), dtype=int))
    with pytest.raises(ValueError, match="rule='simpson'.*allowed"):
        dgm.exact_marginal(dgm.prefixes("in"), rule="simpson")
    with pytest.raises(ValueError, match="num_nodes=1.*allowed"):
        dgm.exact_marginal(dgm.prefixes("in"), num_nodes=1)
    with pytest.raises(ValueError, match="token ids in"):
        dgm.exact_marginal(np.array([[0, 7]]))
    with pytest.raises(ValueError, match="allowed: integer token ids"):
        dgm.exact_marginal(np.zeros((2, 3), dtype=int))
    with pytest.raises(ValueError, match="which='train'.*allowed"):
        dgm.prefixes("train")
    with pytest.raises(ValueError, match="name='strong'.*allowed"):
        PerturbedNextToken.reference("strong")
    with pytest.raises(ValueError, match="network='rnn'.*allowed"):
        dgm.make_student(network="rnn")


def test_exact_marginal_does_not_depend_on_the_order_of_calls():
    """A prefix's cached truth is computed with every enumerated prefix in one pass, so it is bitwise the
    same whichever prefixes were asked for first (a batch of another composition changes the last bits)."""
    first = PerturbedNextToken.reference("five-token", seed=0)
    second = PerturbedNextToken.reference("five-token", seed=0)
    everything = first.prefixes("all")
    for prefix in ([0, 0], [3, 3], [0, 4]):
        second.exact_marginal(np.asarray([prefix]))
    assert np.array_equal(first.exact_marginal(everything), second.exact_marginal(everything))


def test_softmax_rows_equals_torch_softmax_inside_and_outside_the_safe_range():
    import torch

    from simstudy.models.perturbed_lm import softmax_rows

    g = torch.Generator().manual_seed(0)
    for dtype, scale in ((torch.float64, 5.0), (torch.float64, 400.0), (torch.float32, 5.0), (torch.float32, 50.0)):
        logits = scale * torch.randn(300, 41, generator=g, dtype=torch.float64).to(dtype)
        tol = 1e-15 if dtype == torch.float64 else 1e-6
        assert torch.allclose(softmax_rows(logits), torch.softmax(logits, -1), rtol=tol * 10, atol=tol)
