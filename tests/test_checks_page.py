"""The results page (paper_checks/RESULTS.md) is built from the checks' JSON files and the
hand-written investigation in FINDINGS.md."""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from simstudy.checks.runner import read_findings, write_results_page  # noqa: E402


def _fake_result(out, name, decision="pass", replicate_seconds=None):
    folder = out / name
    folder.mkdir(parents=True)
    pd.DataFrame({"method": ["a"], "value": [1.5], "mcse": [0.1]}).to_csv(folder / "table.csv", index=False)
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig(folder / "plot.png")
    plt.close(fig)
    (out / f"{name}.json").write_text(json.dumps({
        "name": name, "claim": f"claim of {name}", "decision_rule": "rule", "decision": decision,
        "summary": f"summary of {name}", "statistics": {"findings": ["a beats b (-0.1)"], "notes": []},
        "tables": ["table"], "figures": [str(folder / "plot.png")], "scale": "full",
        "settings": {"seed": 1}, "seconds": 60.0, "replicate_seconds": replicate_seconds}))


def test_results_page_has_verdicts_tables_figures_and_the_investigation(tmp_path):
    out, page = tmp_path / "results", tmp_path / "paper_checks" / "RESULTS.md"
    out.mkdir()
    page.parent.mkdir()
    _fake_result(out, "rates", "fail", replicate_seconds=90.0)
    _fake_result(out, "efficiency")
    (page.parent / "FINDINGS.md").write_text("# heading ignored\n\n## rates\nThe slope fails because of the "
                                             "pre-asymptotic term.\n\n## efficiency\n- attains the bound\n")
    write_results_page(out, page, command="simstudy check all --page-only")
    text = page.read_text()
    assert "| rates | **FAIL** | summary of rates | full | 1.5 |" in text            # compute, not wall time
    assert "| efficiency | **PASS** | summary of efficiency | full | n/a |" in text  # not recorded
    assert "`simstudy check all --page-only`" in text
    rates = text[text.index("## rates"):]
    assert "**What we found (investigation).**\n\nThe slope fails because of the pre-asymptotic term." in rates
    assert "- a beats b (-0.1)" in rates and "| a | 1.5 | 0.1 |" in text
    assert (tmp_path / "figures" / "paper_checks" / "rates_plot.png").exists()
    assert "](../figures/paper_checks/rates_plot.png)" in text


def test_read_findings_without_a_file_is_empty(tmp_path):
    assert read_findings(tmp_path / "FINDINGS.md") == {}
    (tmp_path / "FINDINGS.md").write_text("intro\n## a\nx\n\n## b\n")
    assert read_findings(tmp_path / "FINDINGS.md") == {"a": "x", "b": ""}


def test_a_check_records_the_time_of_its_study_replicates_stored_rows_included(tmp_path):
    import numpy as np

    from simstudy.checks.base import CHECKS, CheckContext, CheckResult, register, run_check
    from simstudy.engine import Study

    def slow(data, cond):
        import time
        time.sleep(0.01)
        return {"m": float(np.mean(data))}

    study = Study(design={"n": [5]}, generate=lambda c, rng: rng.normal(size=c["n"]), analyse={"m": slow},
                  replicates=6, seed=1)

    @register("toy-timed", "claim")
    def toy(context):
        context.record(study.run(store=tmp_path / "store", progress=False))
        return CheckResult("toy-timed", "claim", "rule", "reported", {}, "summary")

    try:
        first = run_check("toy-timed", CheckContext(out=tmp_path / "out"))
        again = run_check("toy-timed", CheckContext(out=tmp_path / "out"))   # resumes: nothing recomputed
    finally:
        CHECKS.pop("toy-timed")
    assert first.replicate_seconds >= 6 * 0.01
    assert again.replicate_seconds == first.replicate_seconds
    assert json.loads((tmp_path / "out" / "toy-timed.json").read_text())["replicate_seconds"] == first.replicate_seconds
