"""The DGM settings the extrapolation claim depends on (issue 11, DESIGN §4): the teacher's weight law, the
student's width and initial perturbation scale, and the embedding's named features, as keys of
PerturbedNextToken, of a study file's [dgm] table and of a check's --set; the default teacher unchanged."""
import hashlib
import re
import textwrap

import numpy as np
import pytest
import torch

from simstudy.checks.base import CheckContext
from simstudy.checks.extrapolation import dgm_overrides
from simstudy.cli import main
from simstudy.dgm import PerturbedNextToken, dgm_defaults, dgm_keywords, make_dgm
from simstudy.dgm.features import feature_names, parse_features, smooth_features
from simstudy.domain import PerturbationMethod, build_student
from simstudy.studies import spec

NEW_KEYS = {"teacher_law": "scaled", "teacher_weight_sd": 1.0, "teacher_bias_sd": 0.5, "student_hidden": None,
            "student_init_scale": 0.05, "features": None}
SMALL = dict(vocab_size=11, hidden=4, entropy=1.5, seed=3)


def _digest(module: torch.nn.Module, *extra: torch.Tensor, dtype=torch.float64) -> str:
    """sha256 (first 16 hex digits) of a module's state (sorted by name, ``dtype`` bytes) and extra tensors."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().to(dtype).contiguous().numpy().tobytes())
    for t in extra:
        h.update(t.to(dtype).numpy().tobytes())
    return h.hexdigest()[:16]


# Computed with the code before these keys existed (teacher state + embedding; logit scale; student seed 5). The
# teacher's scale comes from a scipy root-finder whose last bit varies with the installed numpy/scipy (seen: 1 ulp
# with scipy 1.17.1), so the teacher is compared in float32 and the scale to 1e-12; the student stays bitwise.
BEFORE = {
    "mlp-seed0": (dict(seed=0), "90c55d61bca5fc28", 0.5658173335794986, "738195e8c90307aa"),
    "mlp-identified-seed3": (dict(design="identified", seed=3), "0b68adbfe48e39ce", 0.7328423971089315,
                             "9af28c3c51f76e8d"),
    "linear-seed0": (dict(teacher="linear", vocab_size=11, seed=0), "37875f47a2672674", 0.8155382272363565,
                     "735416e5681670e0"),
    "transformer-seed1": (dict(teacher="transformer", vocab_size=11, seed=1), "26ec5bd815c87999",
                          2.0161958219217904, "53415c035ef94f76"),
    "mlp-d7-tangent": (dict(vocab_size=11, embed_dim=7, direction="tangent", latent_dim=2, seed=2),
                       "32c1269ad4b96fc2", 0.3353093646812172, "5966ab785036a7c2"),
}


@pytest.mark.parametrize("case", list(BEFORE))
def test_default_settings_give_bitwise_the_earlier_teacher_and_student(case):
    options, teacher, logit_scale, student = BEFORE[case]
    dgm = make_dgm(options)
    assert _digest(dgm.teacher, dgm.embedding, dtype=torch.float32) == teacher
    assert dgm.logit_scale == pytest.approx(logit_scale, rel=1e-12, abs=0)
    assert _digest(dgm.make_student(seed=5)) == student


def test_the_new_keys_are_dgm_keywords_with_their_defaults():
    defaults = dgm_defaults()
    assert set(NEW_KEYS) <= set(dgm_keywords())
    assert {k: defaults[k] for k in NEW_KEYS} == NEW_KEYS and defaults["embed_dim"] is None
    info = PerturbedNextToken(**SMALL).describe(exact=False)
    assert (info["teacher_law"], info["teacher_weight_sd"], info["teacher_bias_sd"]) == ("scaled", None, None)
    assert (info["features"], info["embed_dim"]) == ("s,s^2,sin(pi*s)", 3)
    assert (info["student_hidden"], info["student_init_scale"], info["steepness"]) == (4, 0.05, 2.0)


# ---- teacher law ------------------------------------------------------------------------------------
def test_gaussian_law_weight_statistics():
    dgm = PerturbedNextToken(vocab_size=11, hidden=4000, teacher_law="gaussian", seed=0)
    net = dgm.teacher.network
    W1, b1 = net.hidden.weight.detach().numpy(), net.hidden.bias.detach().numpy()  # (H, L*d), (H,)
    W2, b2 = net.head.weight.detach().numpy(), net.head.bias.detach().numpy()  # (V, H), (V,)
    assert W1.shape == (4000, 6) and abs(W1.std() - 1.0) < 0.02 and abs(W1.mean()) < 0.02
    assert abs(b1.std() - 0.5) < 0.02 and abs(W2.std() - 1.0) < 0.02
    assert np.all(b2 == 0.0)
    assert abs(dgm.teacher_entropy - dgm.entropy) < 1e-6  # the entropy calibration as before
    again = PerturbedNextToken(vocab_size=11, hidden=4000, teacher_law="gaussian", seed=0)
    assert _digest(again.teacher) == _digest(dgm.teacher)  # deterministic in the seed
    info = dgm.describe(exact=False)
    assert (info["teacher_law"], info["teacher_weight_sd"], info["teacher_bias_sd"], info["steepness"]) == (
        "gaussian", 1.0, 0.5, None)


def test_gaussian_law_scales_and_ignores_steepness():
    wide = PerturbedNextToken(vocab_size=11, hidden=2000, teacher_law="gaussian", teacher_weight_sd=2.0,
                              teacher_bias_sd=0.0, seed=1)
    assert np.all(wide.teacher.network.hidden.bias.detach().numpy() == 0.0)
    assert abs(wide.teacher.network.hidden.weight.detach().numpy().std() - 2.0) < 0.05
    a = PerturbedNextToken(**SMALL, teacher_law="gaussian", steepness=2.0)
    b = PerturbedNextToken(**SMALL, teacher_law="gaussian", steepness=5.0)
    assert _digest(a.teacher) == _digest(b.teacher)
    scaled = PerturbedNextToken(**SMALL)
    assert _digest(scaled.teacher) != _digest(a.teacher)
    assert torch.equal(scaled.embedding, a.embedding) and torch.equal(scaled.A_star, a.A_star)  # own streams


def test_gaussian_law_of_the_linear_teacher():
    dgm = PerturbedNextToken(vocab_size=41, teacher="linear", teacher_law="gaussian", teacher_bias_sd=0.0, seed=2)
    W = dgm.teacher.network.head.weight.detach().numpy()  # (V, L*d)
    assert W.shape == (41, 6) and abs(W.std() - 1.0) < 0.15
    assert np.all(dgm.teacher.network.head.bias.detach().numpy() == 0.0)
    assert abs(dgm.teacher_entropy - dgm.entropy) < 1e-6


# ---- student width and initial scale -----------------------------------------------------------------
def test_student_hidden_reaches_the_student_and_an_explicit_width_wins():
    dgm = PerturbedNextToken(**SMALL, student_hidden=7)
    assert dgm.teacher.network.hidden.out_features == 4  # the teacher keeps hidden
    assert dgm.make_student().network.hidden.out_features == 7
    assert dgm.make_student(hidden=5).network.hidden.out_features == 5
    assert build_student(dgm, PerturbationMethod.from_name("mle"), 0).network.hidden.out_features == 7
    assert build_student(dgm, PerturbationMethod.from_name("mle", hidden=9), 0).network.hidden.out_features == 9
    assert PerturbedNextToken(**SMALL).make_student().network.hidden.out_features == 4  # None: the teacher's
    assert dgm.describe(exact=False)["student_hidden"] == 7


@pytest.mark.parametrize("perturbation", ["linear", "mlp"])
def test_student_init_scale_reaches_the_student_and_an_explicit_scale_wins(perturbation):
    plain, scaled = PerturbedNextToken(**SMALL), PerturbedNextToken(**SMALL, student_init_scale=0.5)

    def weights(student):
        p = student.perturbation
        return p.A.detach() if perturbation == "linear" else p.out.weight.detach()

    base = weights(plain.make_student(perturbation=perturbation, seed=1))
    torch.testing.assert_close(weights(scaled.make_student(perturbation=perturbation, seed=1)), 10 * base,
                               rtol=1e-6, atol=0)  # drawn in float32, then cast
    assert torch.equal(weights(scaled.make_student(perturbation=perturbation, seed=1, init_scale=0.05)), base)
    assert PerturbationMethod.from_name("ps-exact").init_scale is None
    method = PerturbationMethod.from_name("ps-exact", perturbation=perturbation)
    assert torch.equal(weights(build_student(scaled, method, 1)), weights(scaled.make_student(
        perturbation=perturbation, seed=1)))
    explicit = PerturbationMethod.from_name("ps-exact", perturbation=perturbation, init_scale=0.05)
    assert torch.equal(weights(build_student(scaled, explicit, 1)), base)


# ---- embedding features -------------------------------------------------------------------------------
def test_feature_names_scheme_parses_and_matches_the_default_features():
    assert feature_names(7) == ("s", "s^2", "sin(pi*s)", "cos(pi*s)", "s^3", "sin(2*pi*s)", "cos(2*pi*s)")
    s = np.linspace(-1, 1, 9)
    for d in (1, 3, 10):
        for derivative in (False, True):
            assert np.array_equal(smooth_features(s, d, derivative=derivative),
                                  smooth_features(s, feature_names(d), derivative=derivative))
    assert parse_features("s, s^5,cos(4*pi*s)") == ("s", "s^5", "cos(4*pi*s)")
    np.testing.assert_allclose(smooth_features(s, ["s^5", "cos(4*pi*s)"]),
                               np.stack([s**5, np.cos(4 * np.pi * s)], axis=-1), rtol=0, atol=1e-15)


@pytest.mark.parametrize("direction", ["random", "tangent"])
def test_a_features_list_naming_the_first_d_features_is_the_default(direction):
    options = dict(SMALL, direction=direction, latent_dim=2)
    default = PerturbedNextToken(**options)
    for features in (["s", "s^2", "sin(pi*s)"], ("s", "s^2", "sin(pi*s)"), "s,s^2,sin(pi*s)"):
        for embed_dim in (None, 3):
            same = PerturbedNextToken(**options, features=features, embed_dim=embed_dim)
            assert torch.equal(same.embedding, default.embedding) and torch.equal(same.A_star, default.A_star)
            assert _digest(same.teacher) == _digest(default.teacher) and same.logit_scale == default.logit_scale
            assert same.describe(exact=False) == default.describe(exact=False)


def test_a_reordered_features_list_reorders_the_embedding_and_the_tangent():
    default = PerturbedNextToken(**SMALL, direction="tangent")
    order = [2, 0, 1]
    names = [feature_names(3)[i] for i in order]
    moved = PerturbedNextToken(**SMALL, direction="tangent", features=names)
    phi = smooth_features(default.coordinates, 3)  # (V, 3)
    noise = default.embedding.numpy() - phi  # (V, 3): the same fixed random part, by position
    np.testing.assert_allclose(moved.embedding.numpy(), phi[:, order] + noise, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(moved.tangent(), default.tangent()[order])
    A, A0 = moved.A_star.numpy(), default.A_star.numpy()  # (L*d, q)
    np.testing.assert_array_equal(A.reshape(2, 3, -1), A0.reshape(2, 3, -1)[:, order])
    assert moved.describe(exact=False)["features"] == "sin(pi*s),s,s^2"


def test_features_set_the_embedding_dimension():
    dgm = PerturbedNextToken(**SMALL, features=["s", "cos(pi*s)", "s^3", "sin(3*pi*s)", "s^4"], direction="tangent")
    assert dgm.embed_dim == 5 and dgm.embedding.shape == (11, 5) and dgm.A_star.shape == (10, 1)
    t = smooth_features(0.5, dgm.features, derivative=True)
    np.testing.assert_allclose(dgm.tangent(), t / np.linalg.norm(t))
    ident = PerturbedNextToken.reference("identified", vocab_size=11, features="s,s^2,s^3,sin(pi*s)")
    assert ident.embed_dim == 4 and ident.A_star.shape == (8, 2)  # the design's d = 3 yields to the features
    rebuilt = make_dgm({**SMALL, "features": dgm.describe(exact=False)["features"]})
    assert torch.equal(rebuilt.embedding, dgm.embedding)


# ---- one-line errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,needle", [
    (dict(teacher_law="uniform"), "teacher_law='uniform' is unknown; allowed: scaled, gaussian"),
    (dict(teacher="transformer", teacher_law="gaussian"), "teacher_law='gaussian' is invalid for teacher="),
    (dict(teacher_weight_sd=0.0), "teacher_weight_sd=0.0 is invalid; allowed: a number in (0, inf)"),
    (dict(teacher_weight_sd="1"), "teacher_weight_sd='1' is invalid"),
    (dict(teacher_bias_sd=-0.5), "teacher_bias_sd=-0.5 is invalid; allowed: a number in [0, inf)"),
    (dict(student_hidden=0), "student_hidden=0 is invalid; allowed: an integer >= 1 or None"),
    (dict(student_hidden="24"), "student_hidden='24' is invalid"),
    (dict(student_hidden=2.5), "student_hidden=2.5 is invalid"),
    (dict(student_hidden=True), "student_hidden=True is invalid"),
    (dict(student_init_scale=0.0), "student_init_scale=0.0 is invalid; allowed: a number in (0, inf)"),
    (dict(student_init_scale=None), "student_init_scale=None is invalid"),
    (dict(features=["x"]), "features entry 'x' is unknown; allowed: s, s^K, sin(pi*s)"),
    (dict(features="s,sin(pi s)"), "features entry 'sin(pi s)' is unknown"),
    (dict(features=["s^1"]), "features entry 's^1' is unknown"),
    (dict(features=[]), "features=[] is invalid; allowed: at least one feature name"),
    (dict(features=["s", "s"]), "features=['s', 's'] names 's' twice"),
    (dict(features=3), "features=3 is invalid; allowed: a list of feature names"),
    (dict(features=["s", "s^2"], embed_dim=3), "embed_dim=3 does not match features (2 names: s,s^2); "
                                               "allowed: embed_dim=2 or None"),
    (dict(embed_dim=0), "embed_dim=0 is invalid; allowed: an integer >= 1 or None"),
])
def test_bad_values_give_one_line_naming_the_key(options, needle):
    with pytest.raises(ValueError) as info:
        PerturbedNextToken(**{**SMALL, **options})
    message = str(info.value)
    assert "\n" not in message and needle in message
    with pytest.raises(ValueError) as again:
        make_dgm({**SMALL, **options})
    assert str(again.value) == message


# ---- round trips: study file and --set -------------------------------------------------------------------
STUDY = """
[study]
kind = "perturbation"
replicates = 1
seed = 1

[design]
n = [60]
teacher_law = ["scaled", "gaussian"]

[dgm]
vocab_size = 11
hidden = 4
entropy = 1.5
seed = 3
features = ["cos(pi*s)", "s", "s^3", "sin(2*pi*s)"]
teacher_weight_sd = 1.5
teacher_bias_sd = 0.25
student_hidden = 6
student_init_scale = 0.2

[defaults]
sgd = { steps = 5, validation_fraction = 0.0 }

[methods.mle]
[methods.ps-mh]
equation_options = { steps = 5 }
"""


def test_the_keys_round_trip_through_a_study_file():
    study = spec.build_study(spec.parse_study_text(textwrap.dedent(STUDY)))
    laws = []
    for c, cond in enumerate(study.conditions):
        dgm = study.generate(cond, study.rng(c, 0)).dgm
        laws.append(dgm.teacher_law)
        assert dgm.features == ("cos(pi*s)", "s", "s^3", "sin(2*pi*s)") and dgm.embed_dim == 4
        assert (dgm.teacher_weight_sd, dgm.teacher_bias_sd) == (1.5, 0.25)
        student = build_student(dgm, PerturbationMethod.from_name("ps-mh"), 0)
        assert student.network.hidden.out_features == 6
        reference = dgm.make_student(seed=0, init_scale=0.2)
        assert torch.equal(student.perturbation.A, reference.perturbation.A)
    assert laws == ["scaled", "gaussian"]
    table = study.run_replicate(1, 0)
    assert list(table["status"]) == ["ok", "ok"]


def _with_dgm(text: str, **values) -> str:
    """STUDY without the teacher_law factor, with [dgm] keys set (replaced or added) to TOML ``values``."""
    text = textwrap.dedent(text).replace('teacher_law = ["scaled", "gaussian"]\n', "")  # the [dgm] value counts
    for key, value in values.items():
        line = f"{key} = {value}"
        text, count = re.subn(rf"(?m)^{key} = .*$", line, text)
        if not count:
            text = text.replace("seed = 3\n", f"seed = 3\n{line}\n", 1)
    return text


@pytest.mark.parametrize("values,needle", [
    (dict(teacher_law='"uniform"'), "teacher_law='uniform' is unknown"),
    (dict(student_hidden="0"), "student_hidden=0 is invalid"),
    (dict(student_init_scale="-1.0"), "student_init_scale=-1.0 is invalid"),
    (dict(features='["s", "t"]'), "features entry 't' is unknown"),
    (dict(features='["s"]', embed_dim="2"), "embed_dim=2 does not match features"),
])
def test_bad_values_in_a_study_file_give_one_line_and_exit_2(tmp_path, capsys, values, needle):
    text = _with_dgm(STUDY, **values)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(spec.SpecError, match="^dgm: " + re.escape(needle)):
        spec.build_study(spec.parse_study_text(text))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_the_keys_round_trip_through_the_checks_set():
    overrides = {"teacher_law": "gaussian", "teacher_weight_sd": "1.5", "teacher_bias_sd": "0",
                 "student_init_scale": "0.2", "features": "s,cos(pi*s),s^3,sin(pi*s)"}
    context = CheckContext(overrides=overrides)
    options = dgm_overrides(context)
    assert set(overrides) <= context.used
    assert options["teacher_weight_sd"] == 1.5 and options["student_init_scale"] == 0.2
    dgm = make_dgm({**options, "design": "identified"})
    assert (dgm.teacher_law, dgm.teacher_weight_sd, dgm.teacher_bias_sd, dgm.student_init_scale) == (
        "gaussian", 1.5, 0.0, 0.2)
    assert dgm.features == ("s", "cos(pi*s)", "s^3", "sin(pi*s)") and dgm.embed_dim == 4
    assert np.all(dgm.teacher.network.head.bias.numpy() == 0.0)
    with pytest.raises(ValueError, match="^--set teacher_weight_sd='wide' is invalid"):
        dgm_overrides(CheckContext(overrides={"teacher_weight_sd": "wide"}))
    with pytest.raises(ValueError, match="^features entry 'x' is unknown"):
        make_dgm({**dgm_overrides(CheckContext(overrides={"features": "s,x"})), "design": "identified"})


def test_student_hidden_round_trips_through_the_checks_set():
    options = dgm_overrides(CheckContext(overrides={"student_hidden": "24"}))
    assert options["student_hidden"] == 24
    assert make_dgm({**options, "design": "identified"}).make_student().network.hidden.out_features == 24
