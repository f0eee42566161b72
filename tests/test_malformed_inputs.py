"""Malformed input (issue 12): one stderr line naming the problem, exit 2, nothing computed first, nothing lost.

Each case starts from a valid small study file (a generic binomial study or a perturbation study) and breaks
one thing, or gives a bad command line. ``simstudy.cli.main`` must return 2, print exactly one line on stderr
that names the key or value, print no traceback, and write nothing (no output folder, nothing outside it).
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from simstudy.cli import main
from study_texts import binomial_study

GENERIC = binomial_study(name="binomial-ci", replicates=2, seed=1, n=(10, 30), methods=("wald", "wilson"),
                         wilson_level=0.95, tail=textwrap.dedent("""\
    [run]
    n_jobs = 1

    [summary]
    reference = "wald"

    [report]
    level = 0.95

    [[rates]]
    metric = "mse:estimate"
    x = "n"
    by = ["method", "p"]
    theory_slope = -1.0
    """))

PERTURBATION = textwrap.dedent("""\
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

    [evaluation]
    bins = 4
    """)


def _levels(k):
    return "[" + ", ".join(str(i + 1) for i in range(k)) + "]"


# (id, base, (old, new), needle that the one line must contain): ``old`` replaced by ``new``; a ``new`` starting
# with "^" is a top-level key: ``old`` is removed and the rest goes before [study] (TOML puts a key written
# after a table header into that table)
FILES = [
    # -- the common tables -------------------------------------------------------------------------------
    ("toml", GENERIC, ("[study]", "[study"), "TOML"),
    ("no-study", GENERIC, ("[study]\n", "[stud]\n"), "study"),
    ("kind-unknown", GENERIC, ('kind = "generic"', 'kind = "nosuch"'), "study.kind"),
    ("kind-type", GENERIC, ('kind = "generic"', "kind = 3"), "study.kind"),
    ("study-key", GENERIC, ("seed = 1\n", "seed = 1\ncolour = 1\n"), "study.colour"),
    ("replicates-0", GENERIC, ("replicates = 2", "replicates = 0"), "study.replicates"),
    ("replicates-neg", GENERIC, ("replicates = 2", "replicates = -3"), "study.replicates"),
    ("replicates-str", GENERIC, ("replicates = 2", 'replicates = "ten"'), "study.replicates"),
    ("replicates-float", GENERIC, ("replicates = 2", "replicates = 1.5"), "study.replicates"),
    ("replicates-huge", GENERIC, ("replicates = 2", "replicates = 9223372036854775807"), "study.replicates"),
    ("replicates-1e8", GENERIC, ("replicates = 2", "replicates = 100000000"), "study.replicates"),
    ("seed-neg", GENERIC, ("seed = 1", "seed = -1"), "study.seed"),
    ("seed-str", GENERIC, ("seed = 1", 'seed = "x"'), "study.seed"),
    ("name-escape", GENERIC, ('name = "binomial-ci"', 'name = "../../escape"'), "study.name"),
    ("name-slash", GENERIC, ('name = "binomial-ci"', 'name = "a/b"'), "study.name"),
    ("name-dotdot", GENERIC, ('name = "binomial-ci"', 'name = ".."'), "study.name"),
    ("name-empty", GENERIC, ('name = "binomial-ci"', 'name = ""'), "study.name"),
    ("name-abs", GENERIC, ('name = "binomial-ci"', 'name = "/tmp/x"'), "study.name"),
    ("description-type", GENERIC, ("seed = 1\n", "seed = 1\ndescription = 5\n"), "study.description"),
    ("fingerprint-type", GENERIC, ("seed = 1\n", "seed = 1\nfingerprint = 3\n"), "study.fingerprint"),
    ("table-unknown", GENERIC, ("[run]", "[nosuch]\n[run]"), "nosuch"),
    ("design-type", GENERIC, ("[design]\nn = [10, 30]\np = [0.2, 0.5]\n", "^design = 3\n"), "design"),
    ("design-empty", GENERIC, ("n = [10, 30]\np = [0.2, 0.5]\n", ""), "design"),
    ("design-level-empty", GENERIC, ("n = [10, 30]", "n = []"), "design.n"),
    ("design-level-table", GENERIC, ("n = [10, 30]", "n = [{ a = 1 }]"), "design.n"),
    ("design-duplicate", GENERIC, ("n = [10, 30]", "n = [10, 10]"), "design"),
    ("design-reserved", GENERIC, ("p = [0.2, 0.5]", "p = [0.2, 0.5]\nmethod = [1]"), "method"),
    ("design-huge", GENERIC, ("n = [10, 30]\np = [0.2, 0.5]",
                              f"n = {_levels(200)}\np = {_levels(200)}\nq = {_levels(200)}"), "design"),
    ("design-and-conditions", GENERIC, ("[generate]", "[[conditions]]\nn = 10\n[generate]"), "conditions"),
    ("conditions-type", GENERIC, ("[design]\nn = [10, 30]\np = [0.2, 0.5]\n", "^conditions = 3\n"), "conditions"),
    ("generate-missing", GENERIC, ('[generate]\nfunction = "simstudy.studies.examples:binomial_data"\n', ""),
     "generate"),
    ("generate-type", GENERIC, ('[generate]\nfunction = "simstudy.studies.examples:binomial_data"\n',
                                "^generate = 5\n"), "generate=5"),
    ("generate-module", GENERIC, ("simstudy.studies.examples:binomial_data", "nosuch_mod_xyz:f"), "generate"),
    ("generate-attr", GENERIC, ("simstudy.studies.examples:binomial_data", "simstudy.studies.examples:nosuch"),
     "generate"),
    ("generate-params", GENERIC, ('binomial_data"\n', 'binomial_data"\nparams = { nosuch = 1 }\n'),
     "generate.params.nosuch"),
    ("truth-type", GENERIC, ('[truth]\nfunction = "simstudy.studies.examples:binomial_truth"\n', "^truth = 3\n"),
     "truth"),
    ("truth-raises", GENERIC, ("p = [0.2, 0.5]", "q = [0.2, 0.5]"), "truth"),
    ("truth-not-a-number", GENERIC, ("simstudy.studies.examples:binomial_truth", "simstudy.studies.examples:binomial_data"),
     "truth"),
    ("methods-missing", GENERIC, ("[methods.wald]", "[other.wald]"), "other"),
    ("methods-none", GENERIC, ('[methods.wald]\nfunction = "simstudy.studies.examples:wald_interval"\n\n'
                               '[methods.wilson]\nfunction = "simstudy.studies.examples:wilson_interval"\n'
                               'params = { level = 0.95 }\n', ""), "methods"),
    ("method-type", GENERIC, ('[methods.wald]\nfunction = "simstudy.studies.examples:wald_interval"\n',
                              "[methods]\nwald = 3\n"), "methods.wald"),
    ("method-function-missing", GENERIC, ('function = "simstudy.studies.examples:wald_interval"', ""),
     "methods.wald.function"),
    ("method-params", GENERIC, ("params = { level = 0.95 }", "params = { nosuch = 0.95 }"),
     "methods.wilson.params.nosuch"),
    ("method-key", GENERIC, ('wald_interval"\n', 'wald_interval"\nfoo = 1\n'), "methods.wald.foo"),
    ("method-reserved", GENERIC, ("[methods.wald]", "[methods.status]"), "methods.status"),
    ("run-n-jobs", GENERIC, ("n_jobs = 1", "n_jobs = 0"), "run.n_jobs"),
    ("run-backend", GENERIC, ("n_jobs = 1", 'backend = "mpi"'), "run.backend"),
    ("run-out", GENERIC, ("n_jobs = 1", 'out = ""'), "run.out"),
    ("run-scheduler", GENERIC, ("n_jobs = 1", "scheduler = 5"), "run.scheduler"),
    ("run-key", GENERIC, ("n_jobs = 1", "threads = 1"), "run.threads"),
    ("run-type", GENERIC, ("[run]\nn_jobs = 1\n", "^run = 3\n"), "run"),
    ("summary-reference", GENERIC, ('reference = "wald"', 'reference = "nosuch"'), "summary.reference"),
    ("summary-alpha", GENERIC, ('reference = "wald"', "alpha = 2"), "summary.alpha"),
    ("summary-type", GENERIC, ('[summary]\nreference = "wald"\n', "^summary = 3\n"), "summary"),
    ("report-level", GENERIC, ("level = 0.95\n\n[[rates]]", "level = 1.5\n\n[[rates]]"), "report.level"),
    ("report-figures", GENERIC, ("level = 0.95\n\n[[rates]]", 'figures = ["nosuch_mod_xyz:f"]\n\n[[rates]]'),
     "report.figures"),
    ("report-figures-type", GENERIC, ("level = 0.95\n\n[[rates]]", "figures = [3]\n\n[[rates]]"), "report.figures"),
    ("report-key", GENERIC, ("level = 0.95\n\n[[rates]]", "dpi = 3\n\n[[rates]]"), "report.dpi"),
    ("rates-type", GENERIC, ('[[rates]]\nmetric = "mse:estimate"\nx = "n"\nby = ["method", "p"]\ntheory_slope = -1.0\n',
                             "^rates = 3\n"), "rates"),
    ("rates-metric-estimand", GENERIC, ('metric = "mse:estimate"', 'metric = "mse:nosuch"'), "rates[0].metric"),
    ("rates-metric-measure", GENERIC, ('metric = "mse:estimate"', 'metric = "rmse:estimate"'), "rates[0].metric"),
    ("rates-metric-empty", GENERIC, ('metric = "mse:estimate"', 'metric = ""'), "rates[0].metric"),
    ("rates-x", GENERIC, ('x = "n"', 'x = "nosuch"'), "rates[0].x"),
    ("rates-by", GENERIC, ('by = ["method", "p"]', 'by = ["nosuch"]'), "rates[0].by"),
    ("rates-pooled", GENERIC, ('by = ["method", "p"]', 'by = ["method"]'), "rates[0].by"),
    ("rates-constant", GENERIC, ("theory_slope = -1.0", "theory_constant = -1.0"), "rates[0].theory_constant"),
    ("rates-scale", GENERIC, ("theory_slope = -1.0", 'scale = "free"'), "rates[0].scale"),
    ("rates-level", GENERIC, ("theory_slope = -1.0", "level = 2"), "rates[0].level"),
    ("rates-key", GENERIC, ("theory_slope = -1.0", "slope = 2"), "rates[0].slope"),
    # -- the perturbation kind ------------------------------------------------------------------------------
    ("dgm-int", PERTURBATION, ('[dgm]\ndesign = "five-token"\nseed = 3\n', "^dgm = 5\n"), "dgm"),
    ("dgm-str", PERTURBATION, ('[dgm]\ndesign = "five-token"\nseed = 3\n', '^dgm = "abc"\n'), "dgm"),
    ("dgm-list", PERTURBATION, ('[dgm]\ndesign = "five-token"\nseed = 3\n', "^dgm = [1, 2]\n"), "dgm"),
    ("dgm-key", PERTURBATION, ("seed = 3", "seed = 3\nvocab = 3"), "dgm.vocab"),
    ("dgm-design", PERTURBATION, ('design = "five-token"', 'design = "nosuch"'), "dgm.design"),
    ("dgm-kind", PERTURBATION, ('design = "five-token"', 'kind = "nosuch"'), "dgm.kind"),
    ("dgm-vocab", PERTURBATION, ("seed = 3", "seed = 3\nvocab_size = 1"), "vocab_size"),
    ("dgm-fresh", PERTURBATION, ("seed = 3", 'seed = 3\nfresh_teacher = "yes"'), "dgm.fresh_teacher"),
    ("defaults-int", PERTURBATION, ("[defaults]\nsgd = { steps = 30, validation_fraction = 0.0 }\n", "^defaults = 3\n"),
     "defaults"),
    ("defaults-key", PERTURBATION, ("[defaults]\n", "[defaults]\nnosuch = 1\n"), "defaults.nosuch"),
    ("sgd-key", PERTURBATION, ("steps = 30,", "nosuch = 30,"), "nosuch"),
    ("sgd-type", PERTURBATION, ("sgd = { steps = 30, validation_fraction = 0.0 }", "sgd = 3"), "sgd"),
    ("evaluation-int", PERTURBATION, ("[evaluation]\nbins = 4\n", "^evaluation = 7\n"), "evaluation"),
    ("evaluation-bins", PERTURBATION, ("bins = 4", "bins = 0"), "evaluation.bins"),
    ("evaluation-mc", PERTURBATION, ("bins = 4", "mc_draws = 1"), "evaluation.mc_draws"),
    ("evaluation-key", PERTURBATION, ("bins = 4", "nosuch = 1"), "evaluation.nosuch"),
    ("headline-unknown", PERTURBATION, ("bins = 4", 'headline = ["nosuch"]'), "evaluation.headline"),
    ("headline-type", PERTURBATION, ("bins = 4", "headline = [1]"), "evaluation.headline"),
    ("n-zero-second", PERTURBATION, ("n = [200]", "n = [500, 0]"), "design.n"),
    ("n-fraction", PERTURBATION, ("n = [200]", "n = [50.5]"), "design.n"),
    ("n-string", PERTURBATION, ("n = [200]", 'n = ["fifty"]'), "design.n"),
    ("n-bool", PERTURBATION, ("n = [200]", "n = [true]"), "design.n"),
    ("n-missing", PERTURBATION, ("n = [200]", "size = [200]"), "design"),
    ("sigma-second", PERTURBATION, ("n = [200]", "n = [200]\nsigma = [0.6, -1.0]"), "sigma"),
    ("teacher-second", PERTURBATION, ("n = [200]", 'n = [200]\nteacher = ["mlp", "rnn"]'), "teacher"),
    ("conditions-n", PERTURBATION, ("[design]\nn = [200]\n", "[[conditions]]\nn = 200\n[[conditions]]\nn = -5\n"),
     "n"),
    ("methods-none-p", PERTURBATION, ("[methods.mle]\n[methods.q2]\nequation_options = { num_draws = 4 }\n", ""),
     "methods"),
    ("method-unknown", PERTURBATION, ("[methods.mle]", "[methods.nope]"), "nope"),
    ("method-key-p", PERTURBATION, ("[methods.mle]", "[methods.mle]\nlr = 0.1"), "lr"),
    ("method-equation", PERTURBATION, ("[methods.mle]", '[methods.custom]\nequation = "nosuch"'), "custom"),
    ("method-solver", PERTURBATION, ("[methods.mle]", '[methods.custom]\nequation = "ps-exact"\nsolver = "bad"'),
     "solver"),
    ("method-num-draws", PERTURBATION, ("num_draws = 4", "num_draws = 1"), "num_draws"),
    ("rates-metric-p", PERTURBATION, ("[evaluation]", '[[rates]]\nmetric = "nosuch"\nx = "n"\n\n[evaluation]'),
     "rates[0].metric"),
]

SNAPSHOT_SKIP = {"study.toml"}


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", FILES, ids=[c[0] for c in FILES])
def test_a_malformed_study_file_gives_one_line_and_exit_2(tmp_path, monkeypatch, capsys, case):
    name, base, change, needle = case
    old, new = change
    text = new[1:] + base.replace(old, "") if new.startswith("^") else base.replace(old, new)
    assert text != base and (not new.startswith("^") or old in base), f"case {name}: the replacement did not apply"
    work = tmp_path / "a" / "b" / "c"  # cwd three levels down: a name with '..' must not escape either
    work.mkdir(parents=True)
    (work / "study.toml").write_text(text)
    monkeypatch.chdir(work)
    before = _files(tmp_path)
    argv = ["run", "study.toml", "--no-progress"] + ([] if name.startswith("name-") else ["--out", "out"])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and needle in err, err
    assert _files(tmp_path) == before, "something was written"


def _cli_cases():
    """(id, setup(tmp) -> argv, needle)"""
    def study(tmp):
        (tmp / "study.toml").write_text(GENERIC)
        return ["run", "study.toml", "--no-progress"]

    def out_file(tmp):
        (tmp / "taken").write_text("x")
        return study(tmp) + ["--out", "taken"]

    def out_under_file(tmp):
        (tmp / "taken").write_text("x")
        return study(tmp) + ["--out", "taken/sub"]

    def out_unwritable(tmp):
        (tmp / "ro").mkdir()
        os.chmod(tmp / "ro", 0o500)
        return study(tmp) + ["--out", "ro/out"]

    def non_utf8(tmp):
        (tmp / "bad.toml").write_bytes(b"\xff\xfe[study]\n")
        return ["run", "bad.toml", "--out", "out"]

    def a_dir(tmp):
        (tmp / "adir").mkdir()
        return ["run", "adir", "--out", "out"]

    def empty_store(tmp):
        (tmp / "empty").mkdir()
        return ["plot", "empty"]

    return [
        ("out-existing-file", out_file, "--out"),
        ("out-under-file", out_under_file, "--out"),
        ("out-unwritable", out_unwritable, "--out"),
        ("scheduler-unreachable", lambda t: study(t) + ["--backend", "dask", "--scheduler", "tcp://127.0.0.1:9",
                                                         "--out", "out"], "--scheduler"),
        ("scheduler-malformed", lambda t: study(t) + ["--backend", "dask", "--scheduler", "not an address",
                                                       "--out", "out"], "--scheduler"),
        ("scheduler-no-port", lambda t: study(t) + ["--backend", "dask", "--scheduler", "tcp://localhost",
                                                     "--out", "out"], "--scheduler"),
        ("scheduler-bad-port", lambda t: study(t) + ["--backend", "dask", "--scheduler", "tcp://localhost:99999",
                                                      "--out", "out"], "--scheduler"),
        ("scheduler-without-dask", lambda t: study(t) + ["--scheduler", "tcp://127.0.0.1:8786", "--out", "out"],
         "--scheduler"),
        ("replicates-0", lambda t: study(t) + ["--replicates", "0", "--out", "out"], "--replicates"),
        ("replicates-huge", lambda t: study(t) + ["--replicates", "9223372036854775807", "--out", "out"],
         "--replicates"),
        ("replicates-word", lambda t: study(t) + ["--replicates", "ten", "--out", "out"], "--replicates"),
        ("n-jobs-0", lambda t: study(t) + ["--n-jobs", "0", "--out", "out"], "--n-jobs"),
        ("backend", lambda t: study(t) + ["--backend", "mpi", "--out", "out"], "--backend"),
        ("missing-file", lambda t: ["run", "nosuch.toml", "--out", "out"], "nosuch.toml"),
        ("a-directory", a_dir, "is a directory"),
        ("not-utf8", non_utf8, "bad.toml"),
        ("unknown-command", lambda t: ["frobnicate"], "frobnicate"),
        ("unknown-option", lambda t: study(t) + ["--frobnicate"], "--frobnicate"),
        ("summarize-missing", lambda t: ["summarize", "nosuch_dir"], "nosuch_dir"),
        ("report-missing", lambda t: ["report", "nosuch_dir"], "nosuch_dir"),
        ("plot-empty", empty_store, "empty"),
    ]


CLI = _cli_cases()


@pytest.mark.parametrize("case", CLI, ids=[c[0] for c in CLI])
def test_a_bad_command_line_gives_one_line_and_exit_2(tmp_path, monkeypatch, capsys, case):
    name, setup, needle = case
    if name == "out-unwritable" and os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    monkeypatch.chdir(tmp_path)
    argv = setup(tmp_path)
    before = _files(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and needle in err, err
    assert _files(tmp_path) == before, "something was written"


def test_the_builtin_demo_has_its_own_output_folder():
    from simstudy.studies import spec

    _, _, out_demo = spec.load_study_file("demo")
    _, _, out_quick = spec.load_study_file("quick")
    assert out_demo == "results/demo" and out_quick == "results/quick"


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert version("simstudy") in capsys.readouterr().out
