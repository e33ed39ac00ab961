"""The experience store: concurrent appends lose nothing, JSONL round trip, adapt/sweep records."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from metapeft.data.episodes import sample_sweep_tasks
from metapeft.errors import UserError
from metapeft.experience import ExperienceRecord, ExperienceStore, record_adapt
from metapeft.select.features import FEATURE_NAMES
from metapeft.sweep import run_sweep


def _rec(i: int, method: str = "lora", acc: float = 0.5, **kw) -> ExperienceRecord:
    return ExperienceRecord(task=f"t{i}", method=method, domain=kw.pop("domain", "d"),
                            features=[float(i + j) for j in range(len(FEATURE_NAMES))],
                            final_accuracy=acc, hyperparameters={"lr": 1e-3, "i": i},
                            source="sweep", **kw)


def _writer(path: str, worker: int) -> None:
    import metapeft  # noqa: F401
    from metapeft.experience import ExperienceStore

    store = ExperienceStore(path)
    for k in range(5):
        store.append([_rec(worker * 100 + k, acc=0.1 * (k + 1))])


def test_concurrent_appends_lose_nothing(tmp_path):
    path = str(tmp_path / "exp.safetensors")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    recs = ExperienceStore(path).load()
    assert len(recs) == 20
    assert len({r.id for r in recs}) == 20
    assert sorted(r.task for r in recs) == sorted(f"t{w * 100 + k}" for w in range(4)
                                                  for k in range(5))


def test_roundtrip_and_import_export(tmp_path):
    store = ExperienceStore(tmp_path / "a.safetensors")
    assert store.load() == []
    ids = store.append([_rec(1, steps_to_target=3, seconds=1.5, peak_memory_mb=12.0,
                             trainable_parameters=1024),
                        _rec(2, "prompt", 0.7, embedding=[0.5] * 16)])
    recs = store.load()
    assert [r.id for r in recs] == ids
    assert recs[0].steps_to_target == 3 and recs[0].trainable_parameters == 1024
    assert recs[1].final_accuracy == 0.7 and recs[1].embedding == [0.5] * 16
    assert recs[0].embedding is None and recs[1].steps_to_target is None
    assert recs[0].hyperparameters == {"lr": 1e-3, "i": 1}
    assert store.get(ids[1][:6]).method == "prompt"
    out = tmp_path / "x.jsonl"
    assert store.export_jsonl(out) == 2
    row = json.loads(out.read_text().splitlines()[0])
    assert list(row["features"]) == list(FEATURE_NAMES)
    other = ExperienceStore(tmp_path / "b.safetensors")
    assert other.import_jsonl(out) == ids
    assert other.import_jsonl(out) == []  # same ids: skipped
    assert [r.to_json() for r in other.load()] == [r.to_json() for r in recs]


def test_bad_inputs_are_user_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="not a safetensors"):
        ExperienceStore(bad).load()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"task": "t", "method": "lora", "features": [1, 2], "final_accuracy": 0.5}\n')
    with pytest.raises(UserError) as e:
        ExperienceStore(tmp_path / "c.safetensors").import_jsonl(rows)
    assert "rows.jsonl:1" in str(e.value) and "features" in str(e.value)
    with pytest.raises(UserError, match="no record"):
        ExperienceStore(tmp_path / "c.safetensors").get("nope")
    # the import reads JSONL as every other input does: line and cause named, nothing appended
    for body, where, cause in [(b'\n[1]\n', ":2", "expected a JSON object"),
                               (b'{"task": \n', ":1", "malformed JSON"),
                               (b'\n\n{"task": "\xff"}\n', ":3", "not valid UTF-8")]:
        rows.write_bytes(body)
        with pytest.raises(UserError) as e:
            ExperienceStore(tmp_path / "c.safetensors").import_jsonl(rows)
        assert f"rows.jsonl{where}" in str(e.value) and cause in str(e.value), str(e.value)
    assert not (tmp_path / "c.safetensors").exists()


def test_record_adapt_from_a_real_run(tmp_path, tiny, small_task):
    from metapeft.api import adapt

    rep = adapt(small_task, model="tiny", method="lora", steps=1)
    store = ExperienceStore(tmp_path / "e.safetensors")
    rid = record_adapt(rep, small_task, store=store, base=tiny)
    r = store.get(rid)
    assert r.method == "lora" and r.source == "adapt" and r.domain == "topic"
    assert r.final_accuracy == pytest.approx(rep.final_accuracy, abs=1e-6)
    assert r.trainable_parameters == rep.extra["trainable_parameters"]
    assert r.hyperparameters["lr"] == rep.extra["lr"] and r.hyperparameters["rank"] == 8
    assert len(r.features) == len(FEATURE_NAMES)


def test_sweep_tasks_are_diverse(tmp_path):
    tasks = sample_sweep_tasks("synthetic", 40, seed=0)
    shots = [t.meta["shots"] for t in tasks]
    ways = [len(t.labels) for t in tasks]
    assert min(shots) >= 1 and max(shots) <= 50 and max(shots) >= 20 and min(shots) <= 3
    assert min(ways) >= 2 and max(ways) <= 20 and max(ways) >= 10
    assert len({t.meta["domain"] for t in tasks}) >= 4
    pool = tmp_path / "pool.jsonl"
    with pool.open("w") as f:
        for d in ("bank", "travel"):
            for lab in range(4):
                for i in range(12):
                    f.write(json.dumps({"text": f"{d} {lab} text {i}", "label": f"{d}_{lab}",
                                        "domain": d}) + "\n")
    tasks = sample_sweep_tasks(pool, 10, seed=1, query=2)
    assert {t.meta["domain"] for t in tasks} == {"bank", "travel"}
    for t in tasks:
        assert all(lab.startswith(t.meta["domain"]) for lab in t.labels)
        assert 1 <= len(t.support) // len(t.labels) <= 10


def test_run_sweep_appends_records(tmp_path, tiny):
    store = ExperienceStore(tmp_path / "s.safetensors")
    tasks = sample_sweep_tasks("synthetic", 1, seed=3, max_shots=4, max_ways=3)
    summary = run_sweep(tasks, ["lora", "prompt"], steps=1, store=store)
    recs = store.load()
    assert summary["records"] == 2 and len(recs) == 2
    assert {r.method for r in recs} == {"lora", "prompt"} and {r.source for r in recs} == {"sweep"}
    assert recs[0].features == recs[1].features
