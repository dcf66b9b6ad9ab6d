"""scripts/reference_run.py: the long models split over the cores, longest first, then the study."""

from __future__ import annotations

from conftest import load_script


def test_models_are_balanced_over_the_cores_longest_first():
    run = load_script("scripts/reference_run.py")
    two = run.queues(list(run.COST), 2)
    assert sorted(m for q in two for m in q) == sorted(run.COST) and len(two) == 2
    loads = [sum(run.COST[m] for m in q) for q in two]
    assert max(loads) - min(loads) <= min(run.COST.values())  # no queue ends more than one short model late
    assert two[0][0] == "official"  # the longest starts first
    assert run.queues(["seed"], 2) == [["seed"]]  # never an empty queue
    assert run.queues(list(run.COST), 1) == [sorted(run.COST, key=lambda m: -run.COST[m])]


def test_dry_run_prints_one_pinned_single_threaded_queue_per_core_then_the_study(tmp_path, capsys):
    run = load_script("scripts/reference_run.py")
    assert run.main(["--run-dir", str(tmp_path / "ref"), "--cores", "1", "--models", "seed", "ssb",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "taskset -c" in out[0] and "reference_models.py seed ssb --run-dir" in out[0]
    assert out[1].endswith(f"-m vericar.study --profile full -p run_dir {tmp_path / 'ref'} --no-progress --publish")
    assert not (tmp_path / "ref").exists()  # a dry run makes nothing
