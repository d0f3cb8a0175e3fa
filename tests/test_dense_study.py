"""The dense-prediction study (experiments/dense_study.py): its pre-registered rules (run length, subsets,
verdict) and its --quick mode end to end (selection on validation, the test scenes read once at the end,
paired statistics, resume by re-running)."""

import json

import pytest
from conftest import needs_fmnist

from experiments.dense_report import verdict, write_doc
from experiments.dense_study import FULL, QUICK, main, run_length, run_name


def test_the_run_length_is_where_validation_miou_has_levelled_off():
    curve = [(250, 10.0), (500, 20.0), (750, 24.5), (1000, 25.2), (1250, 25.9), (1500, 25.0)]
    assert run_length(curve, 1.0) == 1000  # 25.9 is 1.4 above 24.5, never more than 1.0 above 25.2
    assert run_length(curve, 0.5) == 1250  # 25.9 is 0.7 above 25.2
    assert run_length([(250, 1.0), (500, 5.0), (750, 9.0)], 1.0) == 750  # still rising: the whole pilot
    assert run_length([(250, 30.0), (500, 29.0)], 1.0) == 250


@pytest.mark.parametrize("plan", [FULL, QUICK])
def test_labelled_subsets_are_paired_across_arms_disjoint_across_seeds_and_never_validation(plan):
    from mae.data.segmentation import scene_range

    val = scene_range(plan.val.split(":", 1)[1])[1]
    for budget in plan.budgets:
        ranges = [scene_range(plan.budget_range(budget, s).split(":", 1)[1])[1] for s in plan.seeds]
        assert all(b <= val[0] for _, b in ranges)  # labelled scenes come before the validation scenes
        assert all(b - a == min(plan.budgets[budget], plan.labelled) for a, b in ranges)
        if plan.budgets[budget] < plan.labelled:
            assert all(ranges[i][1] <= ranges[i + 1][0] for i in range(len(ranges) - 1))
    assert FULL.budgets == {"1%": 200, "10%": 2000, "100%": 19000} and FULL.seeds == (0, 1, 2)


def _gain(diffs):
    import statistics

    return {"diffs": diffs, "mean": statistics.mean(diffs), "sd": statistics.stdev(diffs),
            "all_positive": all(d > 0 for d in diffs)}  # fmt: skip


def test_the_verdict_follows_the_preregistered_criteria():
    strong, control = _gain([3.5, 4.0, 4.5]), _gain([6.0, 7.0, 8.0])
    null = _gain([0.2, -0.3, 0.4])
    assert verdict({"mae": {"1%": strong, "10%": null}, "control": {"1%": control}})["word"] == "PASS"
    noisy = _gain([0.5, 4.0, 7.5])  # mean 4.0 but sd 3.5: not twice its sd
    assert verdict({"mae": {"1%": noisy, "10%": null}, "control": {"1%": control}})["word"] == "INCONCLUSIVE"
    one_negative = _gain([-0.1, 5.0, 5.1])
    assert (
        verdict({"mae": {"1%": one_negative, "10%": null}, "control": {"1%": control}})["word"]
        == "INCONCLUSIVE"
    )
    weak_control = _gain([2.0, 2.5, 3.0])
    assert (
        verdict({"mae": {"1%": strong, "10%": null}, "control": {"1%": weak_control}})["word"]
        == "INCONCLUSIVE"
    )
    assert verdict({"mae": {"1%": null, "10%": null}, "control": {"1%": control}})["word"] == "FAIL"
    some = _gain([1.5, 1.0, 2.0])  # a gain of 1.5 at 10%: not FAIL
    assert verdict({"mae": {"1%": null, "10%": some}, "control": {"1%": control}})["word"] == "INCONCLUSIVE"
    assert (
        verdict({"mae": {"1%": null, "10%": null}, "control": {"1%": weak_control}})["word"] == "INCONCLUSIVE"
    )


def test_the_table_goes_between_the_markers_and_nowhere_else(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- dense_study:begin -->\nold\n<!-- dense_study:end -->\noutro\n")
    write_doc(doc, "| new |\n")
    assert doc.read_text() == "intro\n<!-- dense_study:begin -->\n| new |\n<!-- dense_study:end -->\noutro\n"
    (tmp_path / "none.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- dense_study:begin -->"):
        write_doc(tmp_path / "none.md", "x")


@needs_fmnist
@pytest.mark.slow
def test_the_quick_study_selects_on_validation_reads_the_test_scenes_last_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] and results["verdict"]["word"] in ("PASS", "FAIL", "INCONCLUSIVE")
    runs = out / "runs"
    for arm, by_budget in results["arms"].items():
        val = {float(lr): m for lr, m in by_budget[QUICK.select_budget]["val_by_lr"].items()}
        chosen = max(val, key=lambda lr: (val[lr], -lr))  # on validation at the selection budget, seed 0
        assert set(val) == set(QUICK.lrs) and results["selection"][arm]["lr"] == chosen
        for budget, cell in by_budget.items():
            assert cell["lr"] == chosen  # the selected lr serves every budget
            assert cell["runs"] == [run_name(arm, budget, chosen, s) for s in QUICK.seeds]
            made = {p.name for p in runs.glob(f"{arm}_{budget.replace('%', 'pct')}_lr*")}
            grid = (
                {run_name(arm, budget, lr, 0) for lr in QUICK.lrs} if budget == QUICK.select_budget else set()
            )
            assert made == set(cell["runs"]) | grid  # no lr grid at the other budgets
            for name in cell["runs"]:
                config = (runs / name / "config.yaml").read_text()
                assert f"val: {QUICK.val}" in config  # trained and selected on validation, never on test
    tested = sorted(p.parent.parent.name for p in runs.glob("*/test/eval.json"))
    assert tested == sorted(results["test"])
    last_training = max(p.stat().st_mtime for p in runs.glob("*/metrics.jsonl"))
    assert min(p.stat().st_mtime for p in runs.glob("*/test/eval.json")) >= last_training
    for arm in ("mae", "control"):
        for budget, gain in results["gains"][arm].items():
            cells = results["arms"]
            expected = [results["test"][a]["miou"] - results["test"][s]["miou"]
                        for a, s in zip(cells[arm][budget]["runs"], cells["scratch"][budget]["runs"])]  # fmt: skip
            assert gain["diffs"] == pytest.approx(expected)
    assert "QUICK MODE" in (out / "results.md").read_text()

    # re-running makes nothing again; a run that is gone is made again, the rest is kept
    times = json.loads((out / "times.json").read_text())
    gone = results["arms"]["scratch"]["10%"]["runs"][1]
    import shutil

    shutil.rmtree(runs / gone)
    capsys.readouterr()
    assert main(["--quick", "--out", str(out)]) == 0
    made = [line.split()[-1] for line in capsys.readouterr().out.splitlines() if line[:2].isdigit()]
    assert made == [gone]
    again = json.loads((out / "results.json").read_text())
    assert {k: v for k, v in again["test"].items() if k != gone} == {
        k: v for k, v in results["test"].items() if k != gone
    }
    assert set(json.loads((out / "times.json").read_text())) == set(times)
