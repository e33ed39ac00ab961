"""Init sources (issue 19 item 5): which starts a task can use (fresh, meta, compose, generate,
route), the ranking learned from experience and shrunk toward the prior, `select` / `adapt
--init auto` / `adapt --method auto` / `sweep --init-sources` end to end, one-line refusals.
Tiny model only."""

from __future__ import annotations

import json

import numpy as np
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
    assert set(why) == {"meta", "compose", "merge", "generate", "route"}
    assert "meta-weights" in why["meta"] and "library is empty" in why["compose"]
    assert why["merge"].startswith("a merge trains a meta-init: no lora meta-weights")
    assert "generator" in why["generate"]
    # a training-free method starts from nothing but itself
    offered, missing = available("prototype", tiny)
    assert [o["source"] for o in offered] == ["fresh"]
    assert all("training-free" in m["reason"] for m in missing) and len(missing) == 5
    # one library LoRA and one published meta-init: meta, compose and route are offered,
    # generate still is not (no generator)
    _publish_meta_init(_fill_library(tmp_path, tiny))
    offered, missing = available("lora", tiny)
    assert [o["source"] for o in offered] == ["fresh", "meta", "compose", "merge", "route"]
    assert [m["source"] for m in missing] == ["generate"]
    meta = next(o for o in offered if o["source"] == "meta")
    assert meta["init"] == "mine@1" and meta["init_options"]["rank"] == 8
    merge = next(o for o in offered if o["source"] == "merge")  # the library under mine@1
    assert merge["init"] == "library:merge+mine@1" and merge["init_options"]["rank"] == 8
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
    from metapeft.init_sources import prior_gain, rank

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
    # shrunk toward the prior: route's gain on "faq" is estimated between the prior's (for a
    # run of unknown length, about 0) and the observed -0.35
    route_b = next(r for r in b["ranking"] if r["source"] == "route")
    assert -0.35 < route_b["expected_gain"] < prior_gain()["route"]
    # only what is offered is ranked: a source that won in the past but is not available now
    # is never recommended
    only = rank(_query(0, dim), _offer("fresh", "compose"), recs, "lora", domain="news")
    assert [r["source"] for r in only["ranking"]] == ["compose", "fresh"]
    # another method's experience says nothing about lora's inits
    other = rank(_query(0, dim), offered, recs, "dora", domain="news")
    assert other["source"] == "priors"


def test_no_evidence_means_the_prior_and_little_evidence_moves_it_a_little():
    from metapeft.init_sources import prior_gain, rank

    offered = _offer("fresh", "meta", "compose", "merge", "generate", "route")
    prior = rank(_query(0, len(FEATURE_NAMES)), offered, [], "lora", steps=1)
    assert prior["source"] == "priors" and "prior for a 1-step run" in prior["reason"]
    order = sorted(prior_gain(1), key=lambda s: -prior_gain(1)[s])
    assert [r["source"] for r in prior["ranking"]] == order
    assert [s for s in order if s != "merge"] == ["meta", "route", "generate", "compose", "fresh"]
    assert max(r["confidence"] for r in prior["ranking"]) < 0.7  # the prior is not certain
    assert rank([0.0] * len(FEATURE_NAMES), _offer("fresh"), [], "lora")["ranking"][0][
        "confidence"] == 1.0  # the only source available
    # one past task where compose beat route by 0.3: compose moves up, but only part of the way
    recs, dim = _records({"x": {"compose": 0.8, "route": 0.5}}, tasks_per_kind=1)
    one = rank(_query(0, dim), offered, recs, "lora", domain="x", steps=1)
    g = {r["source"]: r["expected_gain"] for r in one["ranking"]}
    assert one["evidence_tasks"] == 1
    assert prior_gain(1)["compose"] - prior_gain(1)["route"] < g["compose"] - g["route"] < 0.3
    many, _ = _records({"x": {"compose": 0.8, "route": 0.5}}, tasks_per_kind=10)
    g10 = {r["source"]: r["expected_gain"]
           for r in rank(_query(0, dim), offered, many, "lora", domain="x",
                         steps=1)["ranking"]}
    assert g10["compose"] - g10["route"] > g["compose"] - g["route"]  # more evidence, more trust


def test_the_prior_depends_on_the_run_length():
    """The measured side-by-side table (SmolLM2, 87 tasks): the learned starts lead at steps
    0-1 and are level with fresh LoRA by step 10, so the prior's order changes with the length."""
    from metapeft.init_sources import PRIOR_GAIN_AT, prior_gain, rank

    assert prior_gain(0) == PRIOR_GAIN_AT[0] and prior_gain(5) == PRIOR_GAIN_AT[5]
    assert prior_gain(None) == prior_gain(10) == prior_gain(200) == PRIOR_GAIN_AT[10]
    mid = prior_gain(3)  # halfway between the step-1 and step-5 gains
    for s in PRIOR_GAIN_AT[1]:
        assert abs(mid[s] - (PRIOR_GAIN_AT[1][s] + PRIOR_GAIN_AT[5][s]) / 2) < 1e-6
    offered = _offer("fresh", "compose", "generate", "route")  # no meta-init published
    order = {n: [r["source"] for r in rank([0.0] * len(FEATURE_NAMES), offered, [], "lora",
                                           steps=n)["ranking"]] for n in (0, 1, 10)}
    assert order[0][0] == "compose" and order[1][0] == "route"
    assert order[10][0] == "fresh"  # by step 10 no library start was ahead of fresh LoRA
    short = rank([0.0] * len(FEATURE_NAMES), offered, [], "lora", steps=1)["ranking"]
    long = rank([0.0] * len(FEATURE_NAMES), offered, [], "lora", steps=10)["ranking"]
    assert short[0]["confidence"] > long[0]["confidence"]  # 15 points apart vs 1


def test_evidence_is_read_at_the_planned_step_of_each_curve():
    """Past runs with curves: route led at step 1 and fell behind by step 20. Asked for a
    1-step run the ranking reads the curves at step 1, for a 20-step run at step 20."""
    from metapeft.init_sources import accuracy_at, rank

    rng = np.random.default_rng(0)
    recs = []
    for t in range(8):
        f = [float(v) for v in rng.normal(0, 0.3, len(FEATURE_NAMES))]
        for src, curve in {"fresh": [0.3, 0.4, 0.8, 0.9], "route": [0.6, 0.7, 0.75, 0.7]}.items():
            c = [float(np.clip(a + rng.normal(0, 0.02), 0, 1)) for a in curve]
            recs.append(ExperienceRecord(
                task=f"t{t}", domain="d", method="lora", features=f, source="sweep",
                final_accuracy=c[-1],
                run={"init": None, "init_source": src, "curve": c, "eval_steps": [0, 1, 5, 20]}))
    r = recs[1]
    assert accuracy_at(r, 1) == r.run["curve"][1] and accuracy_at(r, 3) == r.run["curve"][1]
    assert accuracy_at(r, 50) == accuracy_at(r, None) == r.final_accuracy
    late = ExperienceRecord(task="x", domain="d", method="lora", features=[0.0], source="s",
                            final_accuracy=0.5, run={"curve": [0.5], "eval_steps": [5]})
    assert np.isnan(accuracy_at(late, 1))  # nothing measured by step 1
    offered = _offer("fresh", "route")
    q = [0.0] * len(FEATURE_NAMES)
    one, twenty = (rank(q, offered, recs, "lora", domain="d", steps=n) for n in (1, 20))
    assert one["chosen"] == "route" and twenty["chosen"] == "fresh"
    assert one["steps"] == 1 and "1-step run" in one["reason"]
    gain = {n: next(r["expected_gain"] for r in res["ranking"] if r["source"] == "route")
            for n, res in ((1, one), (20, twenty))}
    assert gain[1] > 0.15 and gain[20] < -0.1


def test_records_carry_their_init_source_and_old_records_are_read(home, tmp_path, tiny):
    from metapeft import api
    from metapeft.data.synthetic import generate_task
    from metapeft.experience import init_source_of

    _fill_library(tmp_path, tiny)
    task = generate_task(3, family="topic", ways=3, shots=3, query=3)
    for kw in ({}, {"init": "library:compose:1"}, {"init": "library:merge:1"},
               {"route": "arrow"}):
        api.adapt(task, model="tiny", steps=1, target=None, record_experience=True, **kw)
    recs = ExperienceStore().load()
    assert [r.run["init_source"] for r in recs] == ["fresh", "compose", "merge", "route"]
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
    assert {x["source"] for x in c["unavailable"]} == {"meta", "compose", "merge", "generate",
                                                        "route"}
    # one LoRA in the library: for the recommended 20-step run the prior ranks fresh first
    # (by step 10 no library start was ahead of fresh LoRA), for a 1-step run route
    _fill_library(tmp_path, tiny)
    r = cli("select", task_dir, "--json")
    c = json.loads(r.stdout)["init_sources"]
    assert c["source"] == "priors" and c["chosen"] == "fresh" and c["steps"] == 20
    assert [x["source"] for x in c["ranking"]] == ["fresh", "route", "compose"]
    assert set(c["ranking"][0]) == {"source", "init", "expected_gain", "uncertainty",
                                    "confidence", "runs"}
    h = cli("select", task_dir)
    assert h.exit_code == 0 and "recommended init source: fresh" in h.stdout
    assert "init sources for lora, 20 steps (priors)" in h.stdout
    # what is not available, one reason per line, inside 80 columns when piped
    lines = h.stdout.splitlines()
    at = lines.index("not available:")
    missing = [x for x in lines[at + 1:] if x.startswith("  ")]
    assert {x[2:].split(":")[0] for x in missing if x[2] != " "} == {"meta", "merge", "generate"}
    assert max(map(len, missing)) <= 80
    # adapt --init auto starts from it and says so; the run is recorded as a routed one
    r = cli("adapt", task_dir, "--init", "auto", "--steps", "1", "--json")
    assert r.exit_code == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["init_choice"]["chosen"] == "route" and "route" in obj
    assert obj["init_choice"]["steps"] == 1
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
