"""Init sources (issue 19 item 5): which starts a task can use (fresh, meta, compose, generate,
route), the ranking learned from experience and shrunk toward the prior, `select` / `adapt
--init auto` / `adapt --method auto` / `sweep --init-sources` end to end, one-line refusals.
Tiny model only."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from metapeft.experience import ExperienceRecord, ExperienceStore
from metapeft.select.features import FEATURE_NAMES

LIBRARY = {"compose", "route"}


def cli(*args):
    from metapeft.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _one_line_error(r, text):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and text in lines[0], r.stderr


def _fill_library(tmp_path, tiny, seed=11):
    """One LoRA kept in the library; its adapter directory."""
    from metapeft import api, library
    from metapeft.data.synthetic import generate_task

    task = generate_task(seed, family="topic", ways=3, shots=4, query=4)
    api.adapt(task, model="tiny", steps=2, out=tmp_path / f"lib{seed}", target=None)
    library.add(tmp_path / f"lib{seed}", task=task, base=tiny)
    return tmp_path / f"lib{seed}"


def _publish_meta_init(adapter_dir, name="mine"):
    """A LoRA's tensors published as registry meta-weights (what meta-train would write)."""
    from metapeft import registry
    from metapeft.artifacts import load_safetensors

    arrays, meta = load_safetensors(adapter_dir / "adapters.safetensors")
    registry.save_version(name, dict(arrays), dict(meta))


def test_availability_filters_the_sources(home, tmp_path, tiny):
    from metapeft.init_sources import available

    offered, missing = available("lora", tiny)  # nothing published, empty library
    assert [o["source"] for o in offered] == ["fresh"]
    why = {m["source"]: m["reason"] for m in missing}
    assert set(why) == {"meta", "compose", "generate", "route"}
    assert "meta-weights" in why["meta"] and "library is empty" in why["compose"]
    assert "generator" in why["generate"]
    # a training-free method starts from nothing but itself
    offered, missing = available("prototype", tiny)
    assert [o["source"] for o in offered] == ["fresh"]
    assert all("training-free" in m["reason"] for m in missing) and len(missing) == 4
    # one library LoRA and one published meta-init: meta, compose and route are offered,
    # generate still is not (no generator)
    _publish_meta_init(_fill_library(tmp_path, tiny))
    offered, missing = available("lora", tiny)
    assert [o["source"] for o in offered] == ["fresh", "meta", "compose", "route"]
    assert [m["source"] for m in missing] == ["generate"]
    meta = next(o for o in offered if o["source"] == "meta")
    assert meta["init"] == "mine@1" and meta["init_options"]["rank"] == 8
    assert next(o for o in offered if o["source"] == "route")["route"] == "arrow"
    # a LoRA of another structure fits no library entry (run options are ignored)
    offered, missing = available("lora", tiny, config={"rank": 2, "lr": 0.1, "steps": 3})
    assert LIBRARY.isdisjoint(o["source"] for o in offered)
    assert "structure differs" in {m["source"]: m["reason"] for m in missing}["compose"]


def _records(kinds: dict[str, dict[str, float]], tasks_per_kind=8, seed=0):
    """Past lora tasks of several kinds (domain + a feature cluster), each run from several init
    sources with the given mean accuracies (+ noise)."""
    rng = np.random.default_rng(seed)
    recs = []
    for ki, (kind, accs) in enumerate(kinds.items()):
        centre = np.zeros(len(FEATURE_NAMES))
        centre[ki % len(centre)] = 5.0
        for t in range(tasks_per_kind):
            f = [float(v) for v in centre + rng.normal(0, 0.3, len(centre))]
            for src, acc in accs.items():
                recs.append(ExperienceRecord(
                    task=f"{kind}{t}", domain=kind, method="lora", features=f, source="sweep",
                    final_accuracy=float(np.clip(acc + rng.normal(0, 0.03), 0, 1)),
                    run={"init": None, "init_source": src}))
    return recs, len(FEATURE_NAMES)


def _offer(*sources):
    return [{"source": s, "init": None, "route": None, "init_options": None, "why": "test"}
            for s in sources]


def _query(kind_index: int, dim: int) -> list[float]:
    q = np.zeros(dim)
    q[kind_index] = 5.0
    return [float(v) for v in q]


def test_ranking_learns_which_source_wins_for_which_kind_of_task():
    from metapeft.init_sources import PRIOR_GAIN, rank

    recs, dim = _records({"news": {"fresh": 0.40, "compose": 0.50, "route": 0.85},
                          "faq": {"fresh": 0.75, "compose": 0.45, "route": 0.40}})
    offered = _offer("fresh", "compose", "route")
    a = rank(_query(0, dim), offered, recs, "lora", domain="news")
    b = rank(_query(1, dim), offered, recs, "lora", domain="faq")
    assert a["source"] == b["source"] == "experience" and a["evidence_tasks"] == 8
    assert {s["task"][:4] for s in a["similar_tasks"]} == {"news"}
    assert a["chosen"] == "route" and a["ranking"][0]["confidence"] > 0.9
    assert b["chosen"] == "fresh" and b["ranking"][0]["confidence"] > 0.9
    assert abs(sum(r["confidence"] for r in a["ranking"]) - 1) < 1e-6
    # shrunk toward the prior: route's gain on "faq" is estimated between the prior's +0.10 and
    # the observed -0.35
    route_b = next(r for r in b["ranking"] if r["source"] == "route")
    assert -0.35 < route_b["expected_gain"] < PRIOR_GAIN["route"]
    # only what is offered is ranked: a source that won in the past but is not available now
    # is never recommended
    only = rank(_query(0, dim), _offer("fresh", "compose"), recs, "lora", domain="news")
    assert [r["source"] for r in only["ranking"]] == ["compose", "fresh"]
    # another method's experience says nothing about lora's inits
    other = rank(_query(0, dim), offered, recs, "dora", domain="news")
    assert other["source"] == "priors"


def test_no_evidence_means_the_prior_and_little_evidence_moves_it_a_little():
    from metapeft.init_sources import PRIOR_GAIN, rank

    offered = _offer("fresh", "meta", "compose", "generate", "route")
    prior = rank(_query(0, len(FEATURE_NAMES)), offered, [], "lora")
    assert prior["source"] == "priors" and "prior" in prior["reason"]
    order = sorted(PRIOR_GAIN, key=lambda s: -PRIOR_GAIN[s])
    assert [r["source"] for r in prior["ranking"]] == order == [
        "meta", "route", "generate", "compose", "fresh"]
    assert max(r["confidence"] for r in prior["ranking"]) < 0.7  # the prior is not certain
    assert rank([0.0] * len(FEATURE_NAMES), _offer("fresh"), [], "lora")["ranking"][0][
        "confidence"] == 1.0  # the only source available
    # one past task where compose beat route by 0.3: compose moves up, but only part of the way
    recs, dim = _records({"x": {"compose": 0.8, "route": 0.5}}, tasks_per_kind=1)
    one = rank(_query(0, dim), offered, recs, "lora", domain="x")
    g = {r["source"]: r["expected_gain"] for r in one["ranking"]}
    assert one["evidence_tasks"] == 1
    assert PRIOR_GAIN["compose"] - PRIOR_GAIN["route"] < g["compose"] - g["route"] < 0.3
    many, _ = _records({"x": {"compose": 0.8, "route": 0.5}}, tasks_per_kind=10)
    g10 = {r["source"]: r["expected_gain"]
           for r in rank(_query(0, dim), offered, many, "lora", domain="x")["ranking"]}
    assert g10["compose"] - g10["route"] > g["compose"] - g["route"]  # more evidence, more trust


def test_records_carry_their_init_source_and_old_records_are_read(home, tmp_path, tiny):
    from metapeft import api
    from metapeft.data.synthetic import generate_task
    from metapeft.experience import init_source_of

    _fill_library(tmp_path, tiny)
    task = generate_task(3, family="topic", ways=3, shots=3, query=3)
    for kw in ({}, {"init": "library:compose:1"}, {"route": "arrow"}):
        api.adapt(task, model="tiny", steps=1, target=None, record_experience=True, **kw)
    recs = ExperienceStore().load()
    assert [r.run["init_source"] for r in recs] == ["fresh", "compose", "route"]
    old = ExperienceRecord(task="t", method="lora", features=[0.0] * len(FEATURE_NAMES),
                           final_accuracy=0.5, run={"init": "mine@2"})
    assert init_source_of(old) == "meta"
    assert init_source_of(ExperienceRecord(task="t", method="lora", features=[],
                                           final_accuracy=0.5)) is None


def test_select_and_adapt_auto_end_to_end(home, task_dir, tmp_path, tiny):
    # empty library, nothing published: fresh is all there is
    r = cli("select", task_dir, "--json")
    assert r.exit_code == 0, r.stderr
    c = json.loads(r.stdout)["init_sources"]
    assert c["method"] == "lora" and c["chosen"] == "fresh"
    assert [x["source"] for x in c["ranking"]] == ["fresh"]
    assert {x["source"] for x in c["unavailable"]} == {"meta", "compose", "generate", "route"}
    # one LoRA in the library: the prior ranks route over compose over fresh
    _fill_library(tmp_path, tiny)
    r = cli("select", task_dir, "--json")
    c = json.loads(r.stdout)["init_sources"]
    assert c["source"] == "priors" and c["chosen"] == "route"
    assert [x["source"] for x in c["ranking"]] == ["route", "compose", "fresh"]
    assert set(c["ranking"][0]) == {"source", "init", "expected_gain", "uncertainty",
                                    "confidence", "runs"}
    h = cli("select", task_dir)
    assert h.exit_code == 0 and "recommended init source: route" in h.stdout
    # what is not available, one reason per line, inside 80 columns when piped
    lines = h.stdout.splitlines()
    at = lines.index("not available:")
    missing = [x for x in lines[at + 1:] if x.startswith("  ")]
    assert {x[2:].split(":")[0] for x in missing if x[2] != " "} == {"meta", "generate"}
    assert max(map(len, missing)) <= 80
    # adapt --init auto starts from it and says so; the run is recorded as a routed one
    r = cli("adapt", task_dir, "--init", "auto", "--steps", "1", "--json")
    assert r.exit_code == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["init_choice"]["chosen"] == "route" and "route" in obj
    assert ExperienceStore().load()[-1].run["init_source"] == "route"
    # experience in which compose wins clearly on tasks like this one turns the choice
    from metapeft.select.features import feature_vector

    feats = json.loads(cli("profile", task_dir, "--json").stdout)["features"]
    f = feature_vector(feats)
    past = [ExperienceRecord(task=f"p{t}", domain="topic", method="lora", source="sweep",
                             features=[v + 0.01 * t for v in f], final_accuracy=acc,
                             run={"init": None, "init_source": s})
            for t in range(8) for s, acc in (("compose", 0.9), ("route", 0.4),
                                             ("fresh", 0.5))]
    ExperienceStore().append(past)
    r = cli("adapt", task_dir, "--method", "auto", "--steps", "1", "--json")
    assert r.exit_code == 0, r.stderr
    obj = json.loads(r.stdout)
    d = obj["decision"]
    assert d["method"] == "lora" and d["init_source"] == "compose"
    assert d["init"] == "library:compose" and "composition" in obj
    assert obj["init_choice"]["source"] == "experience"
    assert obj["init_choice"]["evidence_tasks"] == 8
    assert "similar past lora task" in d["init_reason"]
    assert ExperienceStore().load()[-1].run["init_source"] == "compose"


def test_sweep_over_init_sources_and_stats(home, tmp_path, tiny):
    _fill_library(tmp_path, tiny)
    r = cli("sweep", "--methods", "lora", "--tasks", 2, "--steps", 1, "--max-shots", 3,
            "--max-ways", 3, "--query", 2, "--init-sources", "fresh,route,generate", "--json")
    assert r.exit_code == 0, r.stderr
    obj = json.loads(r.stdout)
    plan = obj["init_sources"]["lora"]
    assert plan["ran"] == ["fresh", "route"]
    assert [m["source"] for m in plan["unavailable"]] == ["generate"]
    assert obj["records"] == 4 and all(set(t["accuracy"]) == {"lora", "lora+route"}
                                       for t in obj["results"])
    recs = ExperienceStore().load()
    assert sorted(r.run["init_source"] for r in recs) == ["fresh", "fresh", "route", "route"]
    s = cli("experience", "stats", "--by", "init_source", "--json")
    assert s.exit_code == 0, s.stderr
    groups = {g["group"]: g["runs"] for g in json.loads(s.stdout)["groups"]}
    assert groups == {"fresh": 2, "route": 2}


def test_bad_input_is_one_line(home, task_dir):
    _one_line_error(cli("sweep", "--tasks", 1, "--init-sources", "bogus"),
                    "unknown init source 'bogus'")
    _one_line_error(cli("sweep", "--methods", "lora", "--tasks", 1, "--max-shots", 2,
                        "--max-ways", 2, "--init-sources", "compose,generate"),
                    "none of the init sources compose, generate is available")
    _one_line_error(cli("adapt", task_dir, "--init", "auto", "--route", "arrow"),
                    "--route")
    _one_line_error(cli("experience", "stats", "--by", "init-source"), "--by must be one of")
