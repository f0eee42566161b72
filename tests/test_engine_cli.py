"""The simstudy command line: malformed study files give one line and exit status 2 (issue 3; DESIGN §7)."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from simstudy.cli import main
from simstudy.engine import StudyResult
from simstudy.studies import spec
from study_texts import binomial_study

ROOT = Path(__file__).resolve().parents[1]

VALID = binomial_study(replicates=40, methods=("wald", "wilson"), wilson_level=0.95, tail='''
[summary]
reference = "wald"

[[rates]]
metric = "mse:estimate"
x = "n"
theory_slope = -1.0
''')


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("simstudy: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def _replace(old, new):
    assert old in VALID, old
    return VALID.replace(old, new, 1)


MALFORMED = {
    "not TOML": ("[study\nreplicates = 3", "is not valid TOML"),
    "no [study]": ("[design]\nn = [1]\n", "has no [study] table"),
    "unknown table": (VALID + "\n[extra]\nx = 1\n", "extra is an unknown key; allowed: conditions, design"),
    "unknown key in study": (_replace("seed = 3", "seed = 3\nreplicate = 10"), "study.replicate is an unknown key"),
    "unknown key in a method": (_replace('[methods.wald]\n', '[methods.wald]\nfn = "x"\n'),
                                "methods.wald.fn is an unknown key; allowed: function, params"),
    "wrong type: replicates": (_replace("replicates = 40", 'replicates = "ten"'),
                               "study.replicates='ten' has the wrong type; allowed: an integer"),
    "wrong type: bool for int": (_replace("replicates = 40", "replicates = true"), "study.replicates=True has the wrong type"),
    "wrong type: design level": (_replace("p = [0.2, 0.5]", "p = [{a = 1}]"), "design.p level {'a': 1} has the wrong type"),
    "wrong type: params": (_replace("params = { level = 0.95 }", "params = 0.95"),
                           "methods.wilson.params=0.95 has the wrong type; allowed: a table"),
    "impossible: replicates 0": (_replace("replicates = 40", "replicates = 0"),
                                 "study.replicates=0 is invalid; allowed: an integer >= 1"),
    "impossible: negative seed": (_replace("seed = 3", "seed = -1"), "study.seed=-1 is invalid; allowed: an integer >= 0"),
    "missing seed": (_replace("seed = 3\n", ""), "study.seed is missing"),
    "impossible: n_jobs": (VALID + "\n[run]\nn_jobs = 0\n", "run.n_jobs=0 is invalid"),
    "impossible: backend": (VALID + '\n[run]\nbackend = "spark"\n', "run.backend='spark' is invalid; allowed: 'loky' or 'dask'"),
    "impossible: alpha": (_replace('reference = "wald"', 'reference = "wald"\nalpha = 2'), "summary.alpha=2.0 is invalid"),
    "impossible: rate level": (_replace('theory_slope = -1.0', 'theory_slope = -1.0\nlevel = 1.5'),
                               "rates[0].level=1.5 is invalid; allowed: a number in (0, 1)"),
    "impossible: theory constant": (_replace('theory_slope = -1.0', 'theory_slope = -1.0\ntheory_constant = -2'),
                                    "rates[0].theory_constant=-2.0 is invalid; allowed: a positive number"),
    "impossible: empty levels": (_replace("n = [20, 80]", "n = []"), "design.n=[] is invalid"),
    "impossible: reserved factor": (_replace("n = [20, 80]", "method = [1, 2]"), "factor name 'method' is reserved"),
    "design and conditions": (VALID + "\n[[conditions]]\nn = 5\np = 0.1\n", "design and conditions are both given"),
    "no design": (_replace("[design]\nn = [20, 80]\np = [0.2, 0.5]\n", ""), "design is missing"),
    "no generate": (_replace('[generate]\nfunction = "simstudy.studies.examples:binomial_data"\n', ""),
                    "generate is missing"),
    "no methods": (VALID.split("[methods.wald]")[0] + VALID.split("[summary]")[1].join(["[summary]", ""]),
                   "methods is missing"),
    "unknown kind": (_replace('kind = "generic"', 'kind = "pnt"'), "study.kind='pnt' is invalid; allowed: one of generic"),
    "unknown method function": (_replace("examples:wald_interval", "examples:no_such_method"),
                                "methods.wald.function='simstudy.studies.examples:no_such_method' is invalid"),
    "unknown module": (_replace("simstudy.studies.examples:wald_interval", "no_such_pkg.mod:wald"),
                       "module 'no_such_pkg.mod' cannot be imported"),
    "bad import path": (_replace("simstudy.studies.examples:wald_interval", "simstudy.studies.examples.wald_interval"),
                        "allowed: an import path 'package.module:function'"),
    "unknown method parameter": (_replace("params = { level = 0.95 }", "params = { levl = 0.95 }"),
                                 "methods.wilson.params.levl is not a parameter of simstudy.studies.examples:"
                                 "wilson_interval; allowed: level"),
    "unknown reference method": (_replace('reference = "wald"', 'reference = "score"'),
                                 "summary.reference='score' is not a method of the study; allowed: wald, wilson"),
    "rate x not a factor": (_replace('x = "n"', 'x = "m"'), "rates[0].x='m' is not a design factor; allowed: n, p"),
    "unknown rate key": (_replace('x = "n"', 'x = "n"\nslope = -1'), "rates[0].slope is an unknown key"),
    "unknown figure hook": (VALID + '\n[report]\nfigures = ["simstudy.studies.examples:nope"]\n',
                            "report.figures[0]='simstudy.studies.examples:nope' is invalid"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_study_file_gives_one_line_and_exit_2(case, tmp_path, capsys):
    text, needle = MALFORMED[case]
    path = tmp_path / "study.toml"
    path.write_text(text)
    rc, out, err = _run(["run", path, "--out", tmp_path / "out"], capsys)
    _assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "out").exists()   # nothing ran


def test_missing_file_and_bad_flags_give_one_line_and_exit_2(tmp_path, capsys):
    rc, _, err = _run(["run", tmp_path / "nope.toml"], capsys)
    _assert_one_line_error(rc, err, "nope.toml' does not exist; allowed: a path to a TOML file or a built-in study")
    (tmp_path / "s.toml").write_text(VALID)
    for flags, needle in ((["--n-jobs", "0"], "--n-jobs='0' is invalid"), (["--replicates", "x"], "--replicates='x'"),
                          (["--backend", "spark"], "invalid choice: 'spark'"),
                          (["--scheduler", "tcp://h:1"], "--scheduler='tcp://h:1' needs --backend dask")):
        rc, _, err = _run(["run", tmp_path / "s.toml", "--out", tmp_path / "o", *flags], capsys)
        _assert_one_line_error(rc, err, needle)
    rc, _, err = _run(["frobnicate"], capsys)
    _assert_one_line_error(rc, err, "invalid choice: 'frobnicate'")
    rc, _, err = _run(["summarize", tmp_path / "empty"], capsys)
    _assert_one_line_error(rc, err, "has no manifest.json")


def test_the_console_script_module_prints_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "simstudy.cli", "run", str(tmp_path / "missing.toml")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_run_writes_outputs_and_summarize_plot_report_list_work(tmp_path, capsys):
    (tmp_path / "s.toml").write_text(VALID)
    out = tmp_path / "out"
    rc, stdout, err = _run(["run", tmp_path / "s.toml", "--out", out, "--no-progress"], capsys)
    assert rc == 0, err
    assert "Study 'bin'" in stdout and "coverage" in stdout and "Rate of mse:estimate" in stdout
    table = pd.read_parquet(out / "replicates.parquet")
    assert len(table) == 4 * 40 * 2
    summary = pd.read_csv(out / "summary.csv")
    assert {"coverage", "rel_efficiency", "bias"} <= set(summary["measure"])
    report = (out / "report.md").read_text()
    for heading in ("## Design", "## Failures", "## Performance", "## Rates", "## Figures"):
        assert heading in report
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert {"bias_estimate.png", "coverage_estimate.png", "zip_estimate.png", "rate_0_mse_estimate.png"} <= set(pngs)
    for p in pngs:
        assert f"(figures/{p})" in report and (out / "figures" / p).stat().st_size > 5000
    # re-running resumes: nothing is left to run, the stored table is not rewritten
    before = (out / "replicates.parquet").stat().st_mtime_ns
    first = StudyResult.load(out).table
    rc, stdout2, _ = _run(["run", tmp_path / "s.toml", "--out", out, "--no-progress"], capsys)
    assert rc == 0 and (out / "replicates.parquet").stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(first, StudyResult.load(out).table, check_exact=True)
    # another study into the same directory is refused (fewer replicates is another study)
    rc, _, err = _run(["run", tmp_path / "s.toml", "--out", out, "--replicates", "39"], capsys)
    _assert_one_line_error(rc, err, "holds a different study")
    (out / "summary.csv").unlink()
    rc, stdout, _ = _run(["summarize", out], capsys)
    assert rc == 0 and "rel_efficiency" in stdout and (out / "summary.csv").is_file()
    rc, stdout, _ = _run(["plot", out], capsys)
    assert rc == 0 and "zip_estimate.png" in stdout
    (out / "report.md").unlink()
    rc, stdout, _ = _run(["report", out], capsys)
    assert rc == 0 and (out / "report.md").is_file()
    rc, stdout, _ = _run(["list"], capsys)
    assert rc == 0 and "generic" in stdout and "demo" in stdout and "[default]" in stdout
    # more replicates extend the study in place: the 40 stored replicates are kept as they were
    rc, _, _ = _run(["run", tmp_path / "s.toml", "--out", out, "--replicates", "45", "--no-progress"], capsys)
    grown = StudyResult.load(out)
    assert rc == 0 and grown.manifest["replicates"] == 45 and grown.manifest["extended_from"] == 40
    pd.testing.assert_frame_equal(first, grown.table[grown.table["replicate"] < 40].reset_index(drop=True),
                                  check_exact=True)


def test_run_without_argument_runs_the_default_study(tmp_path, capsys, monkeypatch):
    # the hook: whatever DEFAULT_STUDY names is run (here the generic demo, fast; the domain registers its own)
    monkeypatch.setattr(spec, "DEFAULT_STUDY", "demo")
    monkeypatch.setattr(spec, "PLUGIN_MODULES", [])
    rc, stdout, err = _run(["run", "--out", tmp_path / "quick", "--replicates", "20", "--no-progress"], capsys)
    assert rc == 0, err
    assert "Study 'demo'" in stdout
    assert (tmp_path / "quick" / "report.md").is_file()


def test_registered_kind_and_listing_extension_points(tmp_path, capsys):
    from simstudy.engine import Study

    def build(sf):
        spec.check_keys(sf.tables.get("toy", {}), {"scale"}, "toy")
        scale = spec.get_value(sf.tables.get("toy", {}), "scale", float, "toy", default=1.0,
                               check=lambda v: v > 0, allowed="a positive number")
        return Study(design=sf.design, generate=lambda c, rng: scale * rng.standard_normal(c["n"]),
                     analyse={"mean": lambda d, c: {"estimate": d.mean()}}, truth=lambda c: {"estimate": 0.0},
                     replicates=sf.replicates, seed=sf.seed, name=sf.name, options=sf.options())

    spec.register_kind("toy", build, tables=("toy",), description="a toy kind")
    spec.register_listing("toy things", lambda: {"a": "first", "b": "second"})
    try:
        text = '[study]\nkind = "toy"\nreplicates = 5\nseed = 1\n[design]\nn = [3]\n[toy]\nscale = -1.0\n'
        (tmp_path / "t.toml").write_text(text)
        rc, _, err = _run(["run", tmp_path / "t.toml", "--out", tmp_path / "o"], capsys)
        _assert_one_line_error(rc, err, "toy.scale=-1.0 is invalid; allowed: a positive number")
        (tmp_path / "t.toml").write_text(text.replace("-1.0", "2.0"))
        rc, stdout, err = _run(["run", tmp_path / "t.toml", "--out", tmp_path / "o", "--no-progress"], capsys)
        assert rc == 0, err
        rc, stdout, _ = _run(["list"], capsys)
        assert "toy things:" in stdout and "a toy kind" in stdout
    finally:
        spec.KINDS.pop("toy", None)
        spec._LISTINGS.pop("toy things", None)


def test_plugin_modules_are_imported_before_listing_and_running(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(
        "from simstudy.studies import spec\n"
        "spec.register_study('plugged', spec.DEMO_TOML.replace('name = \"demo\"', 'name = \"plugged\"'), "
        "description='registered by a plugin', out='results/plugged')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(spec, "PLUGIN_MODULES", ["my_plugin"])
    monkeypatch.setattr(spec, "DEFAULT_STUDY", "plugged")
    try:
        rc, stdout, _ = _run(["list"], capsys)
        assert rc == 0 and "plugged" in stdout and "registered by a plugin  [default]" in stdout
        rc, stdout, err = _run(["run", "--out", tmp_path / "o", "--replicates", "5", "--no-progress"], capsys)
        assert rc == 0, err
        assert "Study 'plugged'" in stdout
    finally:
        spec.STUDIES.pop("plugged", None)
        spec._LOADED_PLUGINS.discard("my_plugin")
        sys.modules.pop("my_plugin", None)


def test_engine_cli_and_spec_import_nothing_of_the_perturbation_domain():
    code = ("import sys, simstudy, simstudy.engine, simstudy.cli, simstudy.studies.spec, simstudy.studies.examples\n"
            "from simstudy.engine import plots, report, backends\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[:2] in (['simstudy', 'models'], ['simstudy', 'dgm'],"
            " ['simstudy', 'equations'], ['simstudy', 'fit'], ['simstudy', 'metrics'], ['simstudy', 'llm']))\n"
            "assert not bad, bad\nassert 'torch' not in sys.modules\nprint('clean')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr


def test_check_set_takes_several_values_after_one_flag_or_one_per_flag():
    from simstudy.cli import build_parser

    args = build_parser().parse_args(["check", "rates", "--set", "replicates=4", "seed=2", "--set", "n=10,20"])
    assert args.set == ["replicates=4", "seed=2", "n=10,20"]
