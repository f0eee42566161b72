"""The perturbation study kind (DESIGN §7): study files of the domain, the default study, bad input."""
import textwrap

import numpy as np
import pytest

from simstudy.cli import main
from simstudy.studies import spec

BASE = """
[study]
kind = "perturbation"
replicates = 2
seed = 1

[design]
n = [200]

[dgm]
design = "five-token"
seed = 3

[defaults]
sgd = { steps = 30, validation_fraction = 0.0 }

[methods.mle]
[methods.q2]
equation_options = { num_draws = 4 }
"""


def _study(text):
    sf = spec.parse_study_text(textwrap.dedent(text))
    return spec.build_study(sf)


def test_the_default_study_is_the_domain_quick_study():
    sf, study, out = spec.load_study_file(None)
    assert sf.kind == "perturbation" and sf.name == "quick" and out == "results/quick"
    assert set(study.methods) >= {"mle", "q2", "ps-exact"}


def test_a_replicate_gives_every_method_the_same_data_and_the_domain_metrics():
    study = _study(BASE)
    table = study.run_replicate(0, 0)
    assert list(table["status"]) == ["ok", "ok"]
    for column in ("kl_id", "kl_oos", "tv_id", "tv_oos", "kl_oos_bin1"):
        assert np.isfinite(table[column]).all()
    assert np.isfinite(table.loc[table.method == "q2", "scale_ratio"]).all()  # learned perturbation only
    again = study.run_replicate(0, 0)
    assert table.drop(columns=["_seconds"], errors="ignore").equals(again.drop(columns=["_seconds"], errors="ignore"))


@pytest.mark.parametrize("change,needle", [
    (("[dgm]", "[dgm]\nvocab = 3"), "dgm"),
    (("seed = 3", "seed = 3\nteacher = \"rnn\""), "teacher"),
    (("[methods.mle]", "[methods.mle]\nlr = 0.1"), "lr"),
    (("[methods.mle]", "[methods.nope]"), "nope"),
    (("equation_options = { num_draws = 4 }", "equation_options = { num_draws = 1 }"), "num_draws"),
    (("n = [200]", "size = [200]"), "n"),
    (("[dgm]", "[dgm]\nkind = \"nosuch\""), "dgm.kind"),
    (("[dgm]", "[dgm]\nkind = 3"), "dgm.kind"),
    (("sgd = { steps = 30, validation_fraction = 0.0 }", "sgd = { steps = 30, optimizer = \"rmsprop\" }"),
     "optimizer"),
])
def test_malformed_domain_study_files_give_one_line_and_exit_2(tmp_path, capsys, change, needle):
    path = tmp_path / "bad.toml"
    path.write_text(textwrap.dedent(BASE).replace(*change))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not (tmp_path / "out" / "replicates.parquet").exists()


def test_list_names_the_domain_dgms_methods_and_equations(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("perturbation", "quick", "five-token", "identified", "neftune", "ps-exact", "sumo"):
        assert word in out


def test_dgm_kind_selects_a_registered_dgm_class(tmp_path):
    """Adding a DGM is one class plus its registration (issue 10): a study file selects it by [dgm] kind."""
    from simstudy.dgm import DGMS, PerturbedNextToken, register_dgm

    class FlatterNextToken(PerturbedNextToken):
        """The PNT DGM with a flatter default teacher (a user's own DGM)."""

        kind = "flatter-next-token"

        def __init__(self, *, entropy: float = 1.2, **kwargs):
            super().__init__(entropy=entropy, **kwargs)

    register_dgm("flatter-next-token", FlatterNextToken)
    try:
        text = BASE.replace("[dgm]", "[dgm]\nkind = \"flatter-next-token\"").replace(
            'design = "five-token"\n', "vocab_size = 11\nhidden = 4\n")
        study = _study(text)
        table = study.run_replicate(0, 0)
        assert list(table["status"]) == ["ok", "ok"]
        data = study.generate(study.conditions[0], study.rng(0, 0))
        assert type(data.dgm) is FlatterNextToken and abs(data.dgm.teacher_entropy - 1.2) < 1e-5
        # the default kind on the same settings is a different DGM (its entropy is the constructor default)
        plain = _study(BASE.replace('design = "five-token"\n', "vocab_size = 11\nhidden = 4\n"))
        assert type(plain.generate(plain.conditions[0], plain.rng(0, 0)).dgm) is PerturbedNextToken
    finally:
        DGMS.pop("flatter-next-token", None)
