"""Study files (issue 12): the per-replicate limits as keys of ``[study]``, a truth that raises named by condition,
the current directory kept off the import path, and a command line that starts without torch.

A study file is code (README, "Study files are code"): these tests pin what the command line does and does not
import on its own.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from simstudy.engine import Study, TruthError
from simstudy.studies.spec import SpecError, load_study_file, parse_study_text

ROOT = Path(__file__).resolve().parents[1]

HELPERS = textwrap.dedent("""
    import time, warnings

    def gen(cond, rng):
        return rng.normal(size=cond["n"])

    def slow_when_positive(x, cond):
        if x[0] > 0:
            time.sleep(5.0)
        return {"estimate": float(x.mean())}

    def warns_when_positive(x, cond):
        if x[0] > 0:
            warnings.warn("noisy fit", RuntimeWarning)
        return {"estimate": float(x.mean())}

    def truth(cond):
        return {"estimate": 0.0}

    def truth_fails_at_n10(cond):
        if cond["n"] == 10:
            raise KeyError("no truth for n=10")
        return {"estimate": 0.0}
""")


def study_text(method: str, extra: str = "", *, truth: str = "truth", n: str = "[5]") -> str:
    return textwrap.dedent(f"""
        [study]
        kind = "generic"
        name = "limits"
        replicates = 8
        seed = 11
        {extra}
        [design]
        n = {n}
        [generate]
        function = "sf_helpers:gen"
        [truth]
        function = "sf_helpers:{truth}"
        [methods.m]
        function = "sf_helpers:{method}"
    """)


@pytest.fixture()
def helpers(tmp_path, monkeypatch):
    (tmp_path / "sf_helpers.py").write_text(HELPERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def first_draws(study: Study) -> list[float]:
    return [float(study.rng(0, r).normal(size=5)[0]) for r in range(study.replicates)]


# -- [study] timeout and promote_warnings -----------------------------------------------------------------------
def test_study_file_timeout_records_the_slow_replicates_as_timeout(helpers, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(study_text("slow_when_positive", "timeout = 0.5"))
    sf, study, _ = load_study_file(path)
    assert sf.timeout == 0.5 and study.timeout == 0.5
    res = study.run(progress=False)
    slow = [x > 0 for x in first_draws(study)]
    assert 0 < sum(slow) < study.replicates
    status = res.table.sort_values("replicate")["status"].tolist()
    assert status == ["timeout" if s else "ok" for s in slow]


def test_study_file_promote_warnings_makes_warning_failures_and_changes_the_config_hash(helpers, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(study_text("warns_when_positive", 'promote_warnings = ["RuntimeWarning"]'))
    sf, study, _ = load_study_file(path)
    assert sf.promote_warnings == ("RuntimeWarning",)
    res = study.run(progress=False)
    positive = [x > 0 for x in first_draws(study)]
    status = res.table.sort_values("replicate")["status"].tolist()
    assert status == ["warning" if p else "ok" for p in positive]
    _, plain, _ = load_study_file(path, overrides=["study.promote_warnings=[]"])
    assert plain.promote_warnings == () and plain.config_hash != study.config_hash


def test_limits_round_trip_through_set(helpers, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(study_text("slow_when_positive"))
    _, study, _ = load_study_file(path, overrides=["study.timeout=2.5", 'study.promote_warnings=["UserWarning"]'])
    assert study.timeout == 2.5 and study.promote_warnings == ("UserWarning",)
    _, default, _ = load_study_file(path)
    assert default.timeout is None and default.promote_warnings == ()


@pytest.mark.parametrize("extra, key", [
    ("timeout = 0", "study.timeout=0"),
    ("timeout = -3", "study.timeout=-3"),
    ('timeout = "10s"', "study.timeout='10s'"),
    ("timeout = inf", "study.timeout=inf"),
    ('promote_warnings = "RuntimeWarning"', "study.promote_warnings='RuntimeWarning'"),
    ("promote_warnings = [3]", "study.promote_warnings=[3]"),
    ('promote_warnings = ["NoSuchWarning"]', "study.promote_warnings item 'NoSuchWarning'"),
    ('promote_warnings = ["ValueError"]', "study.promote_warnings item 'ValueError'"),
])
def test_bad_limits_are_one_line_errors_naming_the_key(extra, key):
    with pytest.raises(SpecError) as err:
        parse_study_text(study_text("warns_when_positive", extra))
    message = str(err.value)
    assert "\n" not in message and message.startswith(key) and "allowed:" in message


# -- a truth that raises ----------------------------------------------------------------------------------------
def test_a_truth_that_raises_is_a_truth_error_naming_the_condition(helpers):
    import sf_helpers

    study = Study({"n": [5, 10]}, sf_helpers.gen, {"m": sf_helpers.warns_when_positive},
                  truth=sf_helpers.truth_fails_at_n10, replicates=2, seed=1)
    with pytest.raises(TruthError) as err:
        study.truths()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("truth raised KeyError: 'no truth for n=10' for condition 1 {'n': 10}")
    assert isinstance(err.value, ValueError)  # callers catching ValueError keep working


def test_a_truth_that_raises_is_refused_before_anything_runs_from_the_command_line(helpers, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(study_text("warns_when_positive", truth="truth_fails_at_n10", n="[5, 10]"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(helpers), str(ROOT)]))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "simstudy.cli", "run", str(path), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "simstudy: error: truth raised KeyError: 'no truth for n=10' for condition 1 {'n': 10}; allowed: a truth "
        "function cond -> {estimand: number} defined for every condition"]
    assert not out.exists()


# -- the current directory is not on the import path -----------------------------------------------------------
def test_python_m_does_not_import_a_module_from_the_current_directory(tmp_path):
    (tmp_path / "planted.py").write_text("import pathlib\npathlib.Path('IMPORTED').write_text('yes')\n"
                                         "def f(*a, **k):\n    return {}\n")
    (tmp_path / "s.toml").write_text(textwrap.dedent("""
        [study]
        kind = "generic"
        replicates = 1
        seed = 1
        [design]
        n = [5]
        [generate]
        function = "planted:f"
        [methods.m]
        function = "planted:f"
    """))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "simstudy.cli", "run", "s.toml", "--out", "out"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert not (tmp_path / "IMPORTED").exists()
    line, = proc.stderr.strip().splitlines()
    assert "module 'planted' cannot be imported" in line and "PYTHONPATH" in line
    # an explicit PYTHONPATH that names the folder is honoured
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    proc = subprocess.run([sys.executable, "-m", "simstudy.cli", "run", "s.toml", "--out", "out", "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "IMPORTED").read_text() == "yes"


def test_help_says_a_study_file_is_code():
    from simstudy.cli import build_parser

    text = " ".join(build_parser(describe_default=False)._subparsers._group_actions[0].choices["run"]
                    .format_help().split())
    assert "A study file is code" in text and "PYTHONPATH" in text


# -- a command line that starts without torch -------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["summarize", "--help"], ["check", "--help"]])
def test_version_and_help_import_neither_torch_nor_pandas(argv):
    code = ("import sys, contextlib, io\nfrom simstudy.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()) as out:\n    rc = main({argv!r})\n"
            "heavy = sorted(m for m in ('torch', 'pandas', 'scipy', 'matplotlib') if m in sys.modules)\n"
            "print(rc, heavy, 'simstudy' in out.getvalue())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "0 [] True"
