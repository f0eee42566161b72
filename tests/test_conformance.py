"""Conformance tests in the manner of scikit-learn's estimator checks (DESIGN §2-§4).

Every registered data-generating mechanism (``simstudy.dgm.DGMS``), estimating equation
(``simstudy.equations.EQUATIONS``) and perturbation map (``simstudy.models.PERTURBATIONS``)
must pass the checks below, run at a tiny size (a DGM's ``tiny_options``). A new entry of
any registry is covered by registering it. Statistical checks use fixed seeds and
tolerances derived from binomial standard errors, so they are deterministic.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re

import numpy as np
import pytest
import torch

from simstudy.dgm import (DEFAULT_KIND, DGM, DGM_KEYS, DGM_METHODS, DGMS, Dataset, dgm_defaults, dgm_keywords,
                          make_dgm, register_dgm)
from simstudy.equations import EQUATIONS, SCOPES, make_equation, parse_label
from simstudy.models import PERTURBATIONS, PerturbedLM, make_perturbation

KINDS = sorted(DGMS)
SCALARS = (bool, int, float, str, type(None), np.bool_, np.integer, np.floating)
AUDIT_EXPECTATIONS = ("unbiased", "biased", "mixing", "spread", "no latent")
ROOT_OBJECTIVES = (None, "likelihood", "brier", "mle")
Z = 4.5  # standard errors allowed per comparison (two-sided p ~ 7e-6; a few dozen comparisons per DGM)


def tiny_options(kind: str) -> dict:
    return dict(getattr(DGMS[kind], "tiny_options", {}))


@pytest.fixture(scope="module", params=KINDS)
def dgm(request):
    return make_dgm({"kind": request.param, **tiny_options(request.param)})


# ================================================================================================
# Data-generating mechanisms
# ================================================================================================
def test_dgm_satisfies_the_interface(dgm):
    assert isinstance(dgm, DGM)
    assert DGMS[dgm.kind] is type(dgm)
    for name in ("vocab_size", "prefix_len", "embed_dim", "latent_dim", "observations", "seed"):
        value = getattr(dgm, name)
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 0, name
    assert dgm.vocab_size >= 2 and dgm.prefix_len >= 1 and dgm.latent_dim >= 1 and dgm.observations >= 1
    assert isinstance(dgm.name, str) and dgm.continuation in ("iid", "autoregressive")
    assert dgm.n is None or (isinstance(dgm.n, int) and dgm.n >= 1)
    assert tuple(dgm.embedding.shape) == (dgm.vocab_size, dgm.embed_dim)
    assert isinstance(dgm.teacher, PerturbedLM) and dgm.teacher.vocab_size == dgm.vocab_size


def test_dgm_constructor_takes_keywords_with_defaults(dgm):
    params = list(inspect.signature(type(dgm).__init__).parameters.values())[1:]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty for p in params)
    assert dgm_keywords(dgm.kind) == tuple(p.name for p in params)
    assert dgm_defaults(dgm.kind) == {p.name: p.default for p in params}
    assert set(tiny_options(dgm.kind)) <= set(dgm_keywords(dgm.kind))


def test_sample_is_seeded_with_the_right_shapes(dgm):
    n, L, c, q, V = 257, dgm.prefix_len, dgm.observations, dgm.latent_dim, dgm.vocab_size
    first, again = dgm.sample(n, np.random.default_rng(3)), dgm.sample(n, np.random.default_rng(3))
    other = dgm.sample(n, np.random.default_rng(4))
    assert isinstance(first, Dataset) and len(first) == n and first.observations == c
    for a, b in ((first.x, again.x), (first.y, again.y), (first.z, again.z)):
        assert np.array_equal(a, b)
    assert not np.array_equal(first.y, other.y)
    assert first.x.shape == (n, L) and first.y.shape == (n, c) and first.z.shape == (n, q)
    assert first.x.dtype == np.int64 and first.y.dtype == np.int64
    for tokens in (first.x, first.y):
        assert tokens.min() >= 0 and tokens.max() < V
    assert dgm.in_support(first.x).all()  # training data come from the support
    xt, yt = first.tensors()
    assert xt.dtype == torch.long and yt.dtype == torch.long and tuple(yt.shape) == (n, c)
    at = dgm.prefixes("oos")[:1].repeat(5, 0)  # (5, L)
    assert np.array_equal(dgm.sample(5, np.random.default_rng(0), prefixes=at).x, at)


def test_prefix_sets_support_and_distance(dgm):
    inside, oos, all_ = dgm.prefixes("in"), dgm.prefixes("oos"), dgm.prefixes("all")
    for x in (inside, oos, all_):
        assert x.ndim == 2 and x.shape[1] == dgm.prefix_len and x.dtype == np.int64
    assert len(inside) > 0 and len(oos) > 0 and len(all_) == len(inside) + len(oos)
    assert dgm.in_support(inside).all() and np.all(dgm.distance(inside) == 0)
    assert not dgm.in_support(oos).any() and np.all(dgm.distance(oos) > 0)
    d = dgm.distance(all_)
    assert d.shape == (len(all_),) and np.all(np.isfinite(d)) and np.all((d == 0) == dgm.in_support(all_))


def test_exact_marginal_is_a_distribution(dgm):
    x = dgm.prefixes("all")
    m, err = dgm.exact_marginal(x, return_error=True)
    assert m.shape == err.shape == (len(x), dgm.vocab_size)
    assert np.all(m >= 0) and np.all(err >= 0)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-9)
    assert np.array_equal(dgm.exact_marginal(x), m)  # deterministic (cached or recomputed)
    p0 = dgm.teacher_probs(x)
    assert p0.shape == m.shape and np.all(p0 >= 0)
    np.testing.assert_allclose(p0.sum(1), 1.0, atol=1e-12)


def _probe_prefixes(dgm) -> np.ndarray:
    """Three prefixes: the first and a middle in-support prefix, and the farthest OOS one, ``(3, L)``."""
    inside, oos = dgm.prefixes("in"), dgm.prefixes("oos")
    return np.stack([inside[0], inside[len(inside) // 2], oos[np.argmax(dgm.distance(oos))]])


def test_exact_marginal_matches_sampled_frequencies(dgm):
    """The first observation of data drawn at a prefix has distribution m*(. | x) (either continuation)."""
    n = 20_000
    rng = np.random.default_rng(12)
    for x0 in _probe_prefixes(dgm):
        m = dgm.exact_marginal(x0[None])[0]  # (V,)
        y = dgm.sample(n, rng, prefixes=np.repeat(x0[None], n, axis=0)).y[:, 0]  # (n,)
        freq = np.bincount(y, minlength=dgm.vocab_size) / n
        se = np.sqrt(np.maximum(m * (1 - m), 1.0 / n) / n)  # binomial SE, floored for m ~ 0
        assert np.all(np.abs(freq - m) <= Z * se), (x0, freq, m)


def test_exact_log_likelihood_is_a_joint_distribution(dgm):
    """exp log m*(y | x) over all V^c continuations sums to 1; summing out y_2.. gives the marginal."""
    V, c = dgm.vocab_size, dgm.observations
    ys = np.stack(np.unravel_index(np.arange(V**c), (V,) * c), axis=1).astype(np.int64)  # (V^c, c)
    for x0 in _probe_prefixes(dgm):
        ll = dgm.exact_log_likelihood(np.repeat(x0[None], len(ys), axis=0), ys)  # (V^c,)
        assert ll.shape == (len(ys),) and np.all(np.isfinite(ll))
        joint = np.exp(ll)
        assert math.isclose(joint.sum(), 1.0, abs_tol=1e-8)
        first = np.bincount(ys[:, 0], weights=joint, minlength=V)  # (V,)
        np.testing.assert_allclose(first, dgm.exact_marginal(x0[None])[0], atol=1e-8)


def test_describe_is_a_flat_dict_of_scalars(dgm):
    for exact in (False, True):
        info = dgm.describe(exact=exact)
        assert isinstance(info, dict) and all(isinstance(k, str) for k in info)
        assert all(isinstance(v, SCALARS) for v in info.values()), {k: type(v) for k, v in info.items()}
        assert info["dgm"] == dgm.kind and info["seed"] == dgm.seed


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_make_student_gives_a_seeded_model_of_the_right_shape(dgm, perturbation):
    student = dgm.make_student(perturbation=perturbation, seed=5)
    assert isinstance(student, PerturbedLM)
    assert student.vocab_size == dgm.vocab_size and student.prefix_len == dgm.prefix_len
    assert torch.equal(student.embedding, dgm.embedding)
    x = torch.as_tensor(dgm.prefixes("all"))  # (N, L)
    m = student.marginal(x)
    assert m.probs.shape == (x.shape[0], dgm.vocab_size)
    np.testing.assert_allclose(m.probs.sum(1), 1.0, atol=1e-8)
    again = dgm.make_student(perturbation=perturbation, seed=5)
    for (k, a), (_, b) in zip(student.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_registry_round_trips(dgm):
    options = tiny_options(dgm.kind)
    rebuilt = make_dgm({"kind": dgm.kind, **options})
    assert type(rebuilt) is type(dgm) and rebuilt.describe(exact=False) == dgm.describe(exact=False)
    a, b = dgm.sample(50, np.random.default_rng(1)), rebuilt.sample(50, np.random.default_rng(1))
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    if dgm.kind == DEFAULT_KIND:
        assert make_dgm(options).describe(exact=False) == dgm.describe(exact=False)  # kind is optional
    with pytest.raises(ValueError, match="kind='nope' is unknown; allowed: " + re.escape(", ".join(DGMS))):
        make_dgm({"kind": "nope"})
    with pytest.raises(ValueError, match="option bogus=1 is unknown.*allowed"):
        make_dgm({"kind": dgm.kind, "bogus": 1})


def test_default_kind_designs_and_keys():
    from simstudy.dgm import DESIGNS, PerturbedNextToken
    assert DGMS[DEFAULT_KIND] is PerturbedNextToken and DGM_KEYS == dgm_keywords()
    built = make_dgm({"design": "five-token", "sigma": 0.3, "seed": 2})
    reference = PerturbedNextToken.reference("five-token", sigma=0.3, seed=2)
    assert built.describe(exact=False) == reference.describe(exact=False) and built.name == "five-token"
    assert set(DESIGNS["five-token"]) <= set(DGM_KEYS)
    with pytest.raises(ValueError, match="name='strong' is unknown"):
        make_dgm({"design": "strong"})


def test_register_dgm_rejects_a_class_without_the_interface():
    before = dict(DGMS)
    methods = {name: (lambda self, *args, **kwargs: None) for name in DGM_METHODS}
    Half = type("Half", (), {"kind": "half", "sample": methods["sample"]})
    Positional = type("Positional", (), {"kind": "positional", "__init__": lambda self, size: None, **methods})
    with pytest.raises(ValueError, match="Half lacks prefixes"):
        register_dgm("half", Half)
    with pytest.raises(ValueError, match="argument 'size' is invalid"):
        register_dgm("positional", Positional)
    with pytest.raises(ValueError, match="not yet registered"):
        register_dgm(DEFAULT_KIND, Positional)
    assert DGMS == before


# ================================================================================================
# Estimating equations
# ================================================================================================
@pytest.fixture(scope="module")
def student_data():
    """The default DGM's tiny instance, its well-specified student and 12 data (c = 2 iid)."""
    dgm = make_dgm(tiny_options(DEFAULT_KIND))
    x, y = dgm.sample(12, np.random.default_rng(0)).tensors()
    return dgm.make_student(seed=0), x, y


def _finite_gradients(value: torch.Tensor, model) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, params, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])
    assert torch.isfinite(flat).all()
    return flat


@pytest.mark.parametrize("name", sorted(EQUATIONS))
def test_equation_facts_are_set_and_valid(name):
    cls = EQUATIONS[name]
    assert cls.name == name and isinstance(cls.estimand, str) and cls.estimand
    assert cls.audit_expectation in AUDIT_EXPECTATIONS
    assert cls.root_objective in ROOT_OBJECTIVES
    assert cls.scopes and set(cls.scopes) <= set(SCOPES) and cls.llm_scope in cls.scopes
    assert (cls.label_pattern is None) == (cls.label_option is None)
    if cls.label_pattern is not None:
        assert re.compile(cls.label_pattern).groups == 1
        assert cls.label_option in {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("name", sorted(EQUATIONS))
def test_equation_labels_round_trip(name):
    cls = EQUATIONS[name]
    assert parse_label(cls.label_of()) == (name, {})
    if cls.label_option is not None:
        label = cls.label_of(**{cls.label_option: 7})
        assert parse_label(label) == (name, {cls.label_option: 7})
        assert make_equation(label).get_params()[cls.label_option] == 7


@pytest.mark.parametrize("name", sorted(EQUATIONS))
def test_equation_get_params_clones(name):
    eq = make_equation(name)
    params = eq.get_params()
    clone = type(eq)(**params)
    assert clone is not eq and clone.get_params() == params
    info = eq.describe()
    assert info["equation"] == name and all(isinstance(v, SCALARS) for v in info.values())


@pytest.mark.parametrize("name, scope", [(n, s) for n in sorted(EQUATIONS) for s in EQUATIONS[n].scopes])
def test_equation_loss_and_exact_objective_are_finite(name, scope, student_data):
    student, x, y = student_data
    eq = make_equation(name, scope=scope)
    out = eq.loss(student, x, y, generator=torch.Generator().manual_seed(0), index=torch.arange(x.shape[0]))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert _finite_gradients(out.loss, student).abs().sum() > 0
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.stats.values())
    if EQUATIONS[name].root_objective is not None:
        objective = eq.exact_objective(student, x, y)
        assert objective.dim() == 0 and torch.isfinite(objective)
        _finite_gradients(objective, student)


# ================================================================================================
# Perturbation maps
# ================================================================================================
B, K, L, D, Q, V = 6, 5, 2, 3, 2, 7


def _map(kind: str):
    embedding = torch.randn(V, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return make_perturbation(kind, prefix_len=L, embed_dim=D, latent_dim=Q, embedding=embedding).double(), embedding


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_perturbation_shapes_and_seeded_draws(kind):
    pert, embedding = _map(kind)
    x = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))  # (B, L)
    latent = pert.sample_latent(x, K, torch.Generator().manual_seed(2))  # (B, K', *latent_shape)
    again = pert.sample_latent(x, K, torch.Generator().manual_seed(2))
    assert torch.equal(latent, again)
    draws = 1 if kind == "none" else K
    assert tuple(latent.shape) == (B, draws, *pert.latent_shape)
    assert pert.latent_dim == math.prod(pert.latent_shape)
    out = pert(embedding[x], latent, x)  # (B, K', L, d)
    assert tuple(out.shape) == (B, draws, L, D) and out.dtype == torch.float64 and torch.isfinite(out).all()
    assert isinstance(pert.describe(), dict)
    assert all(isinstance(getattr(pert, a), bool) for a in ("gaussian_latent", "learnable", "perturb_at_eval"))


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_perturbation_latent_law(kind):
    """A map that declares a Gaussian latent draws N(0, 1) entries (quadrature over it is valid)."""
    pert, _ = _map(kind)
    if not pert.gaussian_latent:
        pytest.skip("no Gaussian latent declared")
    z = pert.sample_latent(torch.zeros((400, L), dtype=torch.long), 50, torch.Generator().manual_seed(3))
    z = z.reshape(-1)
    n = z.numel()
    assert abs(float(z.mean())) < Z / math.sqrt(n)
    assert abs(float(z.var()) - 1.0) < Z * math.sqrt(2.0 / n)


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_learnable_maps_have_trainable_parameters(kind):
    pert, embedding = _map(kind)
    params = [p for p in pert.parameters() if p.requires_grad]
    if not pert.learnable:
        assert params == []  # a fixed baseline has nothing to learn
        return
    assert params
    x = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))
    out = pert(embedding[x], pert.sample_latent(x, K, torch.Generator().manual_seed(2)), x)
    grads = torch.autograd.grad(out.square().sum(), params)
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
