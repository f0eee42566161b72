"""``simstudy run STUDY --set TABLE.KEY=VALUE``: the study file's keys from the command line (issue 11: the DGM
keys the claim depends on round-trip through the study file and ``--set``)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from simstudy.studies.spec import SpecError, load_study_file

STUDY = "experiments/identified_small.toml"


def test_set_overrides_a_dgm_key_and_reads_toml_values():
    sf, study, _ = load_study_file(STUDY, overrides=["dgm.teacher_law=gaussian", "dgm.teacher_weight_sd=0.5",
                                                     "dgm.features=\"s,s^2,sin(pi*s)\"", "study.replicates=3"])
    assert sf.tables["dgm"]["teacher_law"] == "gaussian"  # a plain string
    assert sf.tables["dgm"]["teacher_weight_sd"] == 0.5  # a TOML float
    assert sf.tables["dgm"]["features"] == "s,s^2,sin(pi*s)"
    assert sf.replicates == 3 and study.replicates == 3
    sf, study, _ = load_study_file(STUDY, overrides=["design.n=[500, 1000]"])
    assert sf.design == {"n": [500, 1000]} and study.conditions == [{"n": 500}, {"n": 1000}]


@pytest.mark.parametrize("item, message", [
    ("dgm.teacher_law=uniform", "teacher_law"),
    ("dgm.student_hidden=0", "student_hidden"),
    ("teacher_law=gaussian", "TABLE.KEY=VALUE"),
    ("dgm.teacher_law", r"TABLE.KEY=VALUE \(for example dgm.sigma=0.3\)$"),  # not a study file: no hint
    ("dgm.nosuch=1", "nosuch"),
])
def test_bad_overrides_are_one_line(item, message):
    with pytest.raises(SpecError, match=message) as info:
        load_study_file(STUDY, overrides=[item])
    assert "\n" not in str(info.value)


def test_the_command_line_refuses_a_bad_override_before_running(tmp_path):
    out = subprocess.run([sys.executable, "-m", "simstudy.cli", "run", STUDY, "--out", str(tmp_path / "x"),
                          "--set", "dgm.teacher_law=uniform"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "teacher_law" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_study_file_after_set_is_named_in_the_error(tmp_path):
    """``--set`` takes every value after it, so ``run --set KEY=V study.toml`` hands it the study file:
    the one-line error says where the file goes."""
    out = subprocess.run([sys.executable, "-m", "simstudy.cli", "run", "--out", str(tmp_path / "x"),
                          "--set", "study.replicates=2", STUDY], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "a study file goes before --set" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
