"""``[run]`` keys of a study file for the run control of ``simstudy run`` (issue 13): target_mcse,
max_replicates, max_time and figure_format do what their flags do, a flag overrides its key, and a bad value
is one line naming the key, the value and what is allowed."""
import re

import pandas as pd
import pytest

from simstudy.cli import main
from simstudy.cli_run_control import EXIT_OUT_OF_TIME
from simstudy.engine import StudyResult
from simstudy.studies.spec import parse_study_text
from simstudy.studies.tables import SpecError, check_run_table
from study_texts import binomial_study

STUDY = binomial_study(name="keys", replicates=20, seed=7, n=(10, 50), p=(0.1, 0.5))
RUN = """
[run]
n_jobs = 1
target_mcse = { coverage = 0.04 }
max_replicates = 400
figure_format = ["svg", "png"]
"""


def _write(tmp_path, text: str, name: str = "keys.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_run_keys_are_read_and_validated():
    run = parse_study_text(STUDY + RUN + "max_time = 60\n").run
    assert run == {"n_jobs": 1, "target_mcse": {"coverage": 0.04}, "max_replicates": 400,
                   "figure_format": ["svg", "png"], "max_time": 60.0}
    assert check_run_table({"figure_format": "png, svg"})["figure_format"] == ["png", "svg"]


@pytest.mark.parametrize("key, value, message", [
    ("target_mcse", "0.01", "run.target_mcse=0.01 has the wrong type; allowed: a table of measure = MCSE"),
    ("target_mcse", "{}", "run.target_mcse={} is invalid; allowed: a table of measure = MCSE"),
    ("target_mcse", "{ coverage = 0 }", "run.target_mcse.coverage=0.0 is invalid; allowed: an MCSE > 0"),
    ("target_mcse", "{ coverage = 'x' }", "run.target_mcse.coverage='x' has the wrong type; allowed: an MCSE > 0"),
    ("max_replicates", "0", "run.max_replicates=0 is invalid; allowed: an integer >= 1 and <= 10000000"),
    ("max_replicates", "1.5", "run.max_replicates=1.5 has the wrong type; allowed: an integer >= 1"),
    ("max_time", "-1", "run.max_time=-1.0 is invalid; allowed: a number of seconds >= 0"),
    ("max_time", "true", "run.max_time=True has the wrong type; allowed: a number of seconds >= 0"),
    ("figure_format", "'jpg'", "run.figure_format='jpg' is invalid; allowed: one or more of png, svg"),
    ("figure_format", "['png', 'pdf']", "run.figure_format=['png', 'pdf'] is invalid; allowed: one or more of png"),
    ("figure_format", "3", "run.figure_format=3 has the wrong type; allowed: 'png', 'svg', 'png,svg' or a list"),
    ("shard", "'1/2'", "run.shard is an unknown key; allowed: backend, figure_format, max_replicates, max_time"),
])
def test_a_bad_run_key_is_one_line_naming_key_value_and_what_is_allowed(tmp_path, capsys, key, value, message):
    with pytest.raises(SpecError, match="^" + re.escape(message)):
        parse_study_text(STUDY + f"[run]\n{key} = {value}\n")
    assert main(["run", _write(tmp_path, STUDY + f"[run]\n{key} = {value}\n"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_the_study_file_and_the_command_line_give_the_same_run(tmp_path, capsys):
    by_file, by_flags = tmp_path / "file", tmp_path / "flags"
    assert main(["run", _write(tmp_path, STUDY + RUN), "--out", str(by_file), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "precision target: 4 of 4 (condition, measure) pairs at or below the target" in said
    assert "figures: png, svg" in said
    assert main(["run", _write(tmp_path, STUDY, "plain.toml"), "--out", str(by_flags), "--no-progress", "--n-jobs", "1",
                 "--target-mcse", "coverage=0.04", "--max-replicates", "400", "--figure-format", "svg,png"]) == 0
    capsys.readouterr()
    a, b = StudyResult.load(by_file), StudyResult.load(by_flags)
    assert a.complete and b.complete
    cols = [c for c in a.table.columns if c not in ("seconds", "worker", "finished_at")]
    order = ["condition", "replicate", "method"]
    pd.testing.assert_frame_equal(a.table[cols].sort_values(order).reset_index(drop=True),
                                  b.table[cols].sort_values(order).reset_index(drop=True))
    for out in (by_file, by_flags):
        assert sorted(p.suffix for p in (out / "figures").iterdir()) == [".png"] * 3 + [".svg"] * 3
    # the report names the SVG figures first (the first format of the list) and embeds them; both reports
    # give the replicates each condition ended with
    page = (by_file / "report.html").read_text(encoding="utf-8")
    assert "data:image/svg+xml;base64," in page and '<h2 id="precision">Precision target</h2>' in page
    assert "## Precision target" in (by_file / "report.md").read_text(encoding="utf-8")


def test_a_flag_overrides_its_key(tmp_path, capsys):
    path = _write(tmp_path, STUDY + RUN)
    out = tmp_path / "o"
    assert main(["run", path, "--out", str(out), "--no-progress", "--target-mcse", "coverage=0.2",
                 "--figure-format", "png"]) == 0
    said = capsys.readouterr().out
    assert "replicates per condition 20..20" in said  # the first round already meets 0.2
    assert not list((out / "figures").glob("*.svg"))


def test_combinations_the_run_refuses_with_one_line(tmp_path, capsys):
    cases = [(STUDY + "[run]\nmax_replicates = 50\n", [],
              "run.max_replicates=50 needs --target-mcse (or [run] target_mcse)"),
             (STUDY + RUN, ["--shard", "1/2"],
              "--shard=1/2 is invalid with run.target_mcse; allowed: one or the other"),
             (STUDY, ["--shard", "1/2", "--target-mcse", "coverage=0.01"],
              "--shard=1/2 is invalid with --target-mcse; allowed: one or the other"),
             (STUDY + "[run]\ntarget_mcse = { nope = 0.1 }\n", [], "target_mcse measure 'nope' is invalid")]
    for i, (text, flags, message) in enumerate(cases):
        argv = ["run", _write(tmp_path, text, f"c{i}.toml"), "--out", str(tmp_path / f"c{i}"), "--no-progress"]
        assert main(argv + flags) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (i, err)


def test_max_time_in_the_file_stops_the_run_and_says_so(tmp_path, capsys):
    path = _write(tmp_path, STUDY + "[run]\nmax_time = 0\n")
    out = tmp_path / "o"
    assert main(["run", path, "--out", str(out), "--no-progress"]) == EXIT_OUT_OF_TIME
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(err) == 1 and err[0].startswith("simstudy: stopped at run.max_time 0 s after 0 of 80 rows"), err
    assert main(["run", path, "--out", str(out), "--no-progress", "--max-time", "600"]) == 0  # the flag overrides
    assert StudyResult.load(out).complete
