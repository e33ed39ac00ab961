"""metapeft experience stats (issue 16 item 6): what adapt and sweep records now store (the curve,
the target, the init, the project), the statistics per method/domain/project/init over a time
window, records written before those fields existed, and bad --since/--by."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from typer.testing import CliRunner

from metapeft.errors import UserError
from metapeft.experience import ExperienceRecord, ExperienceStore, experience_stats, parse_since
from metapeft.select.features import FEATURE_NAMES

NOW = dt.datetime(2026, 6, 30, 12, 0, tzinfo=dt.timezone.utc)


def _rec(method: str, acc: float, *, stt=None, target=0.8, init=None, project=None,
         days_ago: float = 1, domain: str = "d", run: bool = True) -> ExperienceRecord:
    created = (NOW - dt.timedelta(days=days_ago)).isoformat(timespec="seconds")
    return ExperienceRecord(
        task="t", method=method, features=[0.0] * len(FEATURE_NAMES), final_accuracy=acc,
        domain=domain, steps_to_target=stt, source="adapt", created=created,
        run={"curve": [0.2, acc], "eval_steps": [0, 1], "target": target, "init": init,
             "model": "tiny", "project": project} if run else None)


RECORDS = [
    _rec("lora", 0.9, stt=3, init="w@2", project="alpha"),
    _rec("lora", 0.85, stt=5, init="w@2", project="alpha"),
    _rec("lora", 0.6, stt=None, project="beta"),  # target not reached
    _rec("lora", 0.7, target=None, stt=None),  # a tune trial: no target
    _rec("prototype", 0.8, stt=0, domain="e"),
    _rec("prototype", 0.5, stt=None, run=False, domain="e"),  # written before runs were kept
    _rec("lora", 0.95, stt=1, days_ago=40),  # outside --since 30d
]


def _group(st: dict, name: str) -> dict:
    return next(g for g in st["groups"] if g["group"] == name)


def test_stats_by_method_with_counts():
    st = experience_stats(RECORDS, by="method", since="30d", now=NOW)
    assert st["included"] == 6 and st["older"] == 1 and st["undated"] == 0
    lora = _group(st, "lora")
    assert lora["runs"] == 4 and lora["runs_with_target"] == 3 and lora["reached_target"] == 2
    assert lora["success_rate"] == pytest.approx(2 / 3)
    assert lora["mean_steps_to_target"] == 4 and lora["median_steps_to_target"] == 4
    assert lora["mean_final_accuracy"] == pytest.approx((0.9 + 0.85 + 0.6 + 0.7) / 4)
    proto = _group(st, "prototype")  # the old record counts in runs and accuracy only
    assert proto["runs"] == 2 and proto["runs_with_target"] == 1 and proto["success_rate"] == 1
    assert proto["mean_steps_to_target"] == 0 and proto["mean_final_accuracy"] == 0.65
    assert st["without_target"] == 2 and st["without_run"] == 1
    everything = experience_stats(RECORDS, now=NOW)
    assert everything["included"] == 7 and _group(everything, "lora")["runs"] == 5


def test_stats_by_init_project_domain():
    by_init = experience_stats(RECORDS, by="init", since="30d", now=NOW)
    assert {g["group"]: g["runs"] for g in by_init["groups"]} == {"w@2": 2, "fresh": 3,
                                                                  "unknown": 1}
    assert _group(by_init, "w@2")["success_rate"] == 1.0
    by_project = experience_stats(RECORDS, by="project", since="30d", now=NOW)
    assert {g["group"]: g["runs"] for g in by_project["groups"]} == {"alpha": 2, "beta": 1,
                                                                     "unknown": 3}
    assert _group(by_project, "beta")["success_rate"] == 0.0
    by_domain = experience_stats(RECORDS, by="domain", now=NOW)
    assert [g["group"] for g in by_domain["groups"]] == ["d", "e"]  # most runs first


def test_since_parsing():
    assert parse_since("30d", NOW) == NOW - dt.timedelta(days=30)
    assert parse_since("12h", NOW) == NOW - dt.timedelta(hours=12)
    assert parse_since("2w", NOW) == NOW - dt.timedelta(weeks=2)
    assert parse_since("2026-06-01", NOW) == dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
    for bad in ("yesterday", "30x", "-3d", ""):
        with pytest.raises(UserError, match="--since"):
            parse_since(bad, NOW)
    with pytest.raises(UserError, match="--by must be one of method, domain, project, init"):
        experience_stats(RECORDS, by="task")


def test_old_store_without_runs_still_loads(tmp_path):
    """A store written before records kept their run: it loads, and stats say what is missing."""
    store = ExperienceStore(tmp_path / "old.safetensors")
    old = [_rec("lora", 0.7, stt=2, run=False), _rec("dora", 0.4, run=False)]
    store.append(old)  # records without a run are written as before: no "run" key
    from metapeft.artifacts import read_metadata

    header = json.loads(read_metadata(store.path)["records"])
    assert all("run" not in row for row in header)
    recs = store.load()
    assert [r.run for r in recs] == [None, None]
    st = experience_stats(recs, now=NOW)
    assert _group(st, "lora")["runs"] == 1 and _group(st, "lora")["success_rate"] is None
    assert _group(st, "lora")["mean_final_accuracy"] == 0.7 and st["without_run"] == 2
    # a new record next to them keeps its run through the file and through export/import
    store.append([_rec("lora", 0.9, stt=1, init="w@1", project="p")])
    recs = store.load()
    assert recs[-1].run["init"] == "w@1" and recs[-1].run["curve"] == [0.2, 0.9]
    out = tmp_path / "x.jsonl"
    store.export_jsonl(out)
    other = ExperienceStore(tmp_path / "other.safetensors")
    other.import_jsonl(out)
    assert [r.to_json() for r in other.load()] == [r.to_json() for r in recs]


def test_adapt_and_sweep_records_store_the_run(tmp_path, monkeypatch, small_task):
    """adapt records its curve, target, init, model and the task's project; sweep its target."""
    import copy

    from metapeft import api
    from metapeft.data.episodes import sample_sweep_tasks
    from metapeft.data.tasks import Example
    from metapeft.sweep import run_sweep

    monkeypatch.setenv("METAPEFT_HOME", str(tmp_path / "home"))
    task = copy.copy(small_task)
    task.support = [Example(e.text, e.label, {"project": "acme"}) for e in task.support]
    rep = api.adapt(task, steps=2, target=0.5, record_experience=True)
    rec = ExperienceStore().load()[-1]
    run = rec.run
    assert run["curve"] == [round(a, 6) for a in rep.accuracies] and run["eval_steps"] == [0, 1, 2]
    assert run["target"] == 0.5 and run["init"] is None and run["model"] == "tiny"
    assert run["project"] == "acme" and rec.steps_to_target == rep.steps_to_target
    store = ExperienceStore(tmp_path / "sweep.safetensors")
    run_sweep(sample_sweep_tasks("synthetic", 1, seed=3, max_shots=3, max_ways=3),
              ["lora", "prototype"], steps=2, store=store, eval_every=0)
    recs = {r.method: r for r in store.load()}
    assert recs["lora"].run["target"] == 0.8 and recs["lora"].run["eval_steps"] == [2]
    assert recs["prototype"].run["eval_steps"] == [0] and recs["prototype"].run["init"] is None
    st = api.experience_stats(store.path, by="init").to_json()
    assert st["groups"][0]["group"] == "fresh" and st["groups"][0]["runs"] == 2


def test_stats_cli(tmp_path):
    from metapeft.cli import app

    path = tmp_path / "e.safetensors"
    ExperienceStore(path).append(RECORDS)
    runner = CliRunner()
    r = runner.invoke(app, ["experience", "stats", "--experience", str(path), "--json"])
    assert r.exit_code == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["by"] == "method" and obj["since"] is None and obj["included"] == 7
    assert set(obj["groups"][0]) == {"group", "runs", "runs_with_target", "reached_target",
                                     "success_rate", "mean_steps_to_target",
                                     "median_steps_to_target", "runs_with_accuracy",
                                     "mean_final_accuracy"}
    r = runner.invoke(app, ["experience", "stats", "--experience", str(path), "--by", "init",
                            "--since", "3650d"], env={"COLUMNS": "100"})
    assert r.exit_code == 0 and "fresh" in r.stdout and "w@2" in r.stdout, r.stderr
    assert "recorded no target" in r.stdout
    for args, needle in ((["--by", "task"], "--by must be one of"),
                         (["--since", "soon"], "--since must be a duration")):
        r = runner.invoke(app, ["experience", "stats", "--experience", str(tmp_path / "none"),
                                *args])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.stderr
