"""metapeft tune: search spaces, Pareto helpers, ParEGO, studies (save/resume/failures, names),
warm start, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import metapeft  # noqa: F401  (preloads OpenBLAS before mlx)
from metapeft.errors import UserError
from metapeft.tune import pareto as par
from metapeft.tune.space import SearchSpace, load_space, read_space_file


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Never touch the user's registry / experience store."""
    monkeypatch.setenv("METAPEFT_HOME", str(tmp_path / "home"))


# ------------------------------------------------------------------------------ spaces

def test_packaged_space_file_loads_and_round_trips():
    from metapeft.adapters import METHODS
    from metapeft.config import config_file

    located = config_file("search_spaces.yaml")
    assert located.is_file()
    raw, source, lines = read_space_file()
    assert source == str(located) and lines[("methods", "lora")] > 1
    every = load_space()
    assert every.source == source and set(every.methods) == set(METHODS) == set(raw["methods"])
    again = SearchSpace.from_dict(json.loads(json.dumps(every.to_dict())))
    assert again.to_dict() == every.to_dict() and again.names == every.names
    s = load_space(None, "lora,prompt")
    assert s.names[0] == "method" and "lora.rank" in s.names and "prompt.init" in s.names
    dims = {d.name: d for d in s.dimensions()}
    assert dims["lora.lr"].prior == "log-uniform" and dims["lora.rank"].low == 1
    x = s.encode("prompt", {"lr": 0.03, "num_virtual_tokens": 8, "init": "vocab"})
    assert s.decode(x) == ("prompt", {"lr": 0.03, "num_virtual_tokens": 8, "init": "vocab"})
    x = s.encode("lora", {"lr": 1e-3, "rank": 64, "use_rslora": True})  # projected into range
    method, vals = s.decode(x)
    assert method == "lora" and vals["rank"] == 32 and vals["use_rslora"] is True
    single = load_space(None, ["adalora"])
    assert "method" not in single.names
    for x in single.random_points(20, seed=0):  # target_r is clipped to init_r
        _, v = single.decode(x)
        assert v["target_r"] <= v["init_r"]
    with pytest.raises(UserError, match="no search space"):
        load_space(None, "lora,nope")


def test_default_seed_point_is_what_adapt_runs():
    """A study's default trial for a method is the adapter's own defaults (learning rate and
    options), the configuration `metapeft adapt` uses, and it is a point of the space."""
    from metapeft.adapters import get_adapter_class
    from metapeft.tune.study import Study

    space = load_space()
    study = Study(name="d", path=None, space=space, objectives=["accuracy"], task={})
    defaults = {q["method"]: q for q in study.initial_queue([]) if q["source"] == "default"}
    assert list(defaults) == space.methods
    for m, q in defaults.items():
        cls = get_adapter_class(m)
        adapt = cls.default_hyperparameters()
        assert q["params"] == {k: adapt[k] for k in q["params"]}
        if cls.training_free:  # prototype: its options only, no learning rate
            assert set(q["params"]) == set(space.params[m])
            continue
        assert q["params"]["lr"] == cls.default_lr
        assert set(q["params"]) == set(space.params[m]) | {"lr"}


def test_structural_options_of_an_init_are_pinned(small_task, tmp_path):
    """--init pins the options that fix the adapter's shapes (the adapter's ``structural``)."""
    from metapeft import api
    from metapeft.tune.search import tune

    init = tmp_path / "init"
    api.adapt(small_task, model="tiny", method="lora", steps=1, config={"rank": 4},
              out=init)
    r = tune(small_task, model="tiny", methods="lora", trials=2, steps=2, name="pin",
             registry=tmp_path, init=str(init), objectives="accuracy", record=False,
             warm_start=False)
    assert r.study.space.fixed["lora"]["rank"] == 4 and "rank" not in r.study.space.params["lora"]
    assert all(t["params"]["rank"] == 4 and t["config"]["rank"] == 4 for t in r.study.trials)


@pytest.mark.parametrize("body,line,field", [
    ("methods:\n  lora:\n    lr: {type: real, low: 0.0, high: 1.0, prior: log-uniform}\n",
     3, "methods.lora.lr.low"),
    ("methods:\n  lora:\n    rnak: {type: int, low: 1, high: 8}\n", 3, "methods.lora.rnak"),
    ("methods:\n  lora:\n    rank: {type: int, low: 9, high: 8}\n", 3, "methods.lora.rank.low"),
    ("methods:\n  nope:\n    lr: {type: real, low: 0.1, high: 1.0}\n", 2, "methods.nope"),
    ("methods:\n  prompt:\n    init: {type: categorical, choices: []}\n", 3,
     "methods.prompt.init.choices"),
    ("methods:\n  lora:\n    lr: {type: real, low: 1, high: [\n", None, None),
])
def test_space_yaml_errors_name_file_line_field(tmp_path, body, line, field):
    p = tmp_path / "space.yaml"
    p.write_text(body)
    with pytest.raises(UserError) as e:
        load_space(p)
    msg = e.value.one_line()
    assert "\n" not in msg and msg.startswith(str(p))
    if line is not None:
        assert e.value.line == line and e.value.field == field
    else:
        assert "invalid YAML" in msg


# ------------------------------------------------------------------------------ pareto

def test_non_dominated_hypervolume_knee_on_hand_made_points():
    senses = ["max", "min"]  # accuracy, seconds
    pts = [[0.9, 10.0], [0.8, 2.0], [0.85, 5.0], [0.7, 3.0], [0.9, 12.0], [0.5, 1.0],
           [math.nan, 1.0]]
    assert par.non_dominated(pts, senses) == [0, 1, 2, 5]
    assert par.dominates([0.9, 1.0], [0.8, 2.0], senses)
    assert not par.dominates([0.9, 3.0], [0.8, 2.0], senses)
    # ref (acc 0, 20 s): staircase of the front {(.5,1), (.8,2), (.85,5), (.9,10)}
    hv = par.hypervolume_2d(pts, senses, [0.0, 20.0])
    expected = 0.5 * (2 - 1) + 0.8 * (5 - 2) + 0.85 * (10 - 5) + 0.9 * (20 - 10)
    assert hv == pytest.approx(expected)
    assert par.hypervolume_2d([[0.5, 1.0]], senses, [0.0, 2.0]) == pytest.approx(0.5)
    assert par.hypervolume_2d([], senses, [0.0, 2.0]) == 0.0
    # knee: normalised over the front, (0.8, 2) is nearest the ideal (0.9, 1)
    assert par.knee_point(pts, senses) == 1
    assert par.knee_point([[math.nan, 1.0]], senses) is None
    # three objectives
    p3 = [[0.9, 1.0, 5.0], [0.9, 1.0, 4.0], [0.95, 2.0, 9.0]]
    assert par.non_dominated(p3, ["max", "min", "min"]) == [1, 2]


def test_parego_scalarisation_matches_formula():
    from metapeft.tune.pareto import scalarise

    pts = np.array([[0.9, 10.0, 100.0], [0.5, 2.0, 50.0], [0.7, 6.0, 75.0], [np.nan] * 3])
    w = np.array([0.5, 0.3, 0.2])
    y = scalarise(pts, ["max", "min", "min"], w)
    # normalised (0 = best): acc (0.9 - a)/0.4, seconds (s - 2)/8, memory (m - 50)/50
    z = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0]])
    expected = [max(w * r) + 0.05 * sum(w * r) for r in z]
    assert y == pytest.approx(expected)
    assert y[3] == pytest.approx(max(y))  # a failed trial is the worst
    # one objective: 1 - accuracy, failures at the worst
    y1 = scalarise(pts[:, :1], ["max"], [1.0])
    assert y1 == pytest.approx([0.1, 0.5, 0.3, 1.0])
    # weights are on the simplex and reproducible per (seed, trial)
    rng = np.random.default_rng([0, 3])
    lam = par.simplex_weights(3, rng)
    assert lam.sum() == pytest.approx(1.0) and np.all(lam >= 0)


# ------------------------------------------------------------------------------ studies

def _count_trials(path):
    from metapeft.artifacts import json_field, read_metadata

    return len(json_field(read_metadata(path), "trials"))


def test_study_runs_saves_each_trial_and_resumes(small_task, tmp_path):
    from metapeft.tune import Study, study_path, tune

    reg = tmp_path / "reg"
    saved = []

    def on_trial(study, trial):
        saved.append(_count_trials(study.path))

    r = tune(small_task, model="tiny", methods="lora,prompt", trials=4, steps=3, name="st",
             registry=reg, seed=0, on_trial=on_trial)
    path = study_path("st", reg)
    assert path.exists() and saved == [1, 2, 3, 4]
    assert [t["source"] for t in r.study.trials[:2]] == ["default", "default"]
    assert all(t["status"] == "ok" for t in r.study.trials)
    first = [t["x"] for t in r.study.trials]
    loaded = Study.load(path)
    assert [t["x"] for t in loaded.trials] == first and loaded.objectives == [
        "accuracy", "seconds", "memory"]
    from metapeft.artifacts import load_safetensors

    arrays, _ = load_safetensors(path)
    assert tuple(arrays["objectives"].shape) == (4, 3)

    with pytest.raises(UserError, match="exists"):
        tune(small_task, model="tiny", methods="lora", trials=1, steps=3, name="st",
             registry=reg)
    r2 = tune(small_task, resume="st", trials=6, registry=reg)
    xs = [json.dumps(t["x"]) for t in r2.study.trials]
    assert len(xs) == 6 and len(set(xs)) == 6
    assert [t["x"] for t in r2.study.trials[:4]] == first
    assert [t["index"] for t in r2.study.trials] == list(range(6))
    s = r2.summary
    assert s["recommended"]["index"] in [p["index"] for p in s["pareto"]]
    assert s["hypervolume_accuracy_seconds"] > 0


@pytest.mark.parametrize("name", ["out/studyz", "../../y", "/tmp/abs", "", ".hidden", "a b",
                                  ".safetensors"])
def test_study_names_follow_the_registry_rules(tmp_path, name):
    from metapeft.tune.study import study_path

    with pytest.raises(UserError, match="study"):
        study_path(name, tmp_path)


def test_study_path_of_a_name_and_of_an_explicit_path(tmp_path):
    from metapeft.tune.study import study_path

    assert study_path("s-1.v2", tmp_path) == tmp_path / "studies" / "s-1.v2.safetensors"
    assert study_path("out/s.safetensors", tmp_path) == Path("out/s.safetensors")


def test_cli_study_name_is_checked_before_anything_is_written(small_task, tmp_path,
                                                              monkeypatch):
    """Issue 15: `--name out/studyz` exited 0 with a 0-byte study; `--name ../../y` wrote /y."""
    d = _task_dir(small_task, tmp_path / "task")
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    before = sorted(p for p in tmp_path.rglob("*"))
    for name in ("out/studyz", "../../y"):
        res = CliRunner().invoke(_app(), ["tune", str(d), "--name", name, "--registry",
                                          str(tmp_path / "reg")])
        assert res.exit_code == 2, res.output
        assert "invalid study name" in res.output and "Traceback" not in res.output
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_cli_study_at_an_explicit_path_is_written_atomically_and_resumes(small_task, tmp_path,
                                                                        monkeypatch):
    d = _task_dir(small_task, tmp_path / "task")
    monkeypatch.chdir(tmp_path)
    args = ["--registry", str(tmp_path / "reg"), "--no-record", "--json"]
    res = CliRunner().invoke(_app(), ["tune", str(d), "--name", "out/s.safetensors", "--methods",
                                      "lora", "--trials", "1", "--steps", "1", "--objectives",
                                      "accuracy", "--no-warm-start", *args])
    assert res.exit_code == 0, res.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["s.safetensors"]  # no orphan
    assert _count_trials(tmp_path / "out" / "s.safetensors") == 1
    res = CliRunner().invoke(_app(), ["tune", "--resume", "out/s.safetensors", "--trials", "2",
                                      *args])
    assert res.exit_code == 0, res.output
    assert _count_trials(tmp_path / "out" / "s.safetensors") == 2


def test_failed_trial_is_recorded_and_study_continues(small_task, tmp_path):
    from metapeft import api
    from metapeft.tune.search import tune

    calls = {"n": 0}

    def flaky_adapt(task, **kw):
        calls["n"] += 1
        if calls["n"] == 1:  # a real divergence: huge learning rate -> NaN loss
            kw["lr"] = 1e6
        if calls["n"] == 2:
            raise MemoryError("simulated out of memory")
        return api.adapt(task, **kw)

    r = tune(small_task, model="tiny", methods="lora", trials=4, steps=3, name="fl",
             registry=tmp_path, objectives="accuracy", adapt_fn=flaky_adapt, record=False)
    st = [t["status"] for t in r.study.trials]
    assert len(st) == 4 and st[1] == "failed" and st.count("ok") >= 2
    assert "MemoryError" in r.study.trials[1]["reason"]
    if st[0] == "failed":
        assert "lr" in r.study.trials[0]["reason"] or "loss" in r.study.trials[0]["reason"]
    assert all(t["index"] not in [0, 1] or t["status"] == "failed"
               for t in r.summary["pareto"] if st[t["index"]] == "failed")
    assert all(p["status"] == "ok" for p in r.summary["pareto"])


def test_warm_start_from_experience(small_task, tmp_path):
    pytest.importorskip("metapeft.experience")
    from metapeft.data.synthetic import generate_task
    from metapeft.tune.search import tune
    from metapeft.tune.warm_start import warm_start_points

    assert warm_start_points(small_task, ["lora"], 3, registry=tmp_path) == []
    r = tune(small_task, model="tiny", methods="lora", trials=3, steps=2, name="w1",
             registry=tmp_path, objectives="accuracy")
    assert r.experience_records == 3
    other = generate_task(11, family="topic", ways=3, shots=4, query=4)
    pts = warm_start_points(other, ["lora"], 3, registry=tmp_path)
    assert pts and pts[0]["method"] == "lora" and "lr" in pts[0]["params"]
    r2 = tune(other, model="tiny", methods="lora", trials=2, steps=2, name="w2",
              registry=tmp_path, objectives="accuracy")
    assert r2.warm_points >= 1 and r2.study.trials[0]["source"] == "warm"


def _feature_row(**values):
    from metapeft.select.features import FEATURE_NAMES

    row = dict.fromkeys(FEATURE_NAMES, 1.0)
    row.update(values)
    return [row[n] for n in FEATURE_NAMES]


def _store_tasks(registry, tasks):
    """Experience records, one per (task, method, accuracy, hyperparameters, source)."""
    from metapeft.experience import ExperienceStore
    from metapeft.tune.warm_start import experience_path

    ExperienceStore(experience_path(registry)).append([
        {"task": t, "method": m, "features": f, "final_accuracy": a, "hyperparameters": hp,
         "source": src, "seconds": 1.0, "peak_memory_mb": 2.0, "domain": t}
        for t, f, m, a, hp, src in tasks])


class _Named:
    def __init__(self, name):
        self.name = name


def test_warm_start_takes_only_adapt_configs_of_the_method(tmp_path):
    """Issue 15: a meta-train record's settings (algorithm, inner_lr) were copied in as a LoRA
    config; only the learning rate and Config options of non-meta-train records count."""
    from metapeft.tune.warm_start import warm_start_points

    q = _feature_row(label_entropy=0.5)
    _store_tasks(tmp_path, [
        ("mt", _feature_row(label_entropy=0.6), "lora", 0.99,
         {"algorithm": "reptile", "inner_lr": 0.01}, "meta-train"),
        ("sw", _feature_row(label_entropy=0.7), "lora", 0.6,
         {"lr": 0.002, "rank": 4, "steps": 5, "objective": "ce", "bogus": 1}, "sweep"),
        ("sw", _feature_row(label_entropy=0.7), "prompt", 0.9, {"lr": 0.05}, "sweep"),
        ("query", q, "lora", 0.4, {"lr": 0.01, "alpha": 8.0}, "tune"),
    ])
    pts = warm_start_points(_Named("query"), ["lora"], 3, registry=tmp_path, features=q)
    assert [(p["task"], p["params"]) for p in pts] == [
        ("query", {"lr": 0.01, "alpha": 8.0}), ("sw", {"lr": 0.002, "rank": 4})]
    assert pts[0]["objectives"] == {"accuracy": pytest.approx(0.4), "seconds": 1.0,
                                    "memory_mb": 2.0}
    assert pts[0]["distance"] == 0.0 and "objectives" not in pts[1]


def test_warm_start_ranks_tasks_with_the_trained_embedder(tmp_path):
    """With a trained task embedder saved where `train-selector` puts it, past tasks are ranked
    by embedding distance (select.embedder.nearest); without one, by normalised features."""
    import mlx.core as mx

    from metapeft.select.embedder import (EMBED_DIM, HIDDEN, TaskEmbedder, _mlp,
                                          fit_normaliser)
    from metapeft.select.features import FEATURE_NAMES
    from metapeft.tune.warm_start import embedder_path, warm_start_points

    tasks = {"a": _feature_row(label_entropy=0.0),
             "b": _feature_row(label_entropy=0.5, zero_shot_loss=3.0),
             "c": _feature_row(label_entropy=0.9, zero_shot_loss=9.0),
             "d": _feature_row(label_entropy=1.0, zero_shot_loss=60.0)}
    _store_tasks(tmp_path, [(t, f, "lora", 0.5, {"lr": 0.001}, "sweep")
                            for t, f in tasks.items()])
    q = _feature_row(label_entropy=1.0)

    def order():
        pts = warm_start_points(_Named("q"), ["lora"], 3, registry=tmp_path, features=q)
        return [p["task"] for p in pts], {p["similarity"] for p in pts}

    # z-scored features: "d" has q's label entropy but a far-off zero-shot loss
    assert order() == (["c", "b", "d"], {"features"})
    # an embedder that sees only label_entropy: embedding ~ its normalised value
    net = _mlp(len(FEATURE_NAMES), HIDDEN, EMBED_DIM, 0)
    j = FEATURE_NAMES.index("label_entropy")
    w1 = np.zeros((HIDDEN, len(FEATURE_NAMES)), np.float32)
    w1[0, j] = 0.1
    w2 = np.zeros((EMBED_DIM, HIDDEN), np.float32)
    w2[0, 0] = 10.0
    net.layers[0].weight, net.layers[0].bias = mx.array(w1), mx.zeros(HIDDEN)
    net.layers[2].weight, net.layers[2].bias = mx.array(w2), mx.zeros(EMBED_DIM)
    mean, std = fit_normaliser(np.asarray(list(tasks.values())))
    TaskEmbedder(net, mean, std).save(embedder_path(tmp_path))
    assert order() == (["d", "c", "b"], {"embedder"})
    embedder_path(tmp_path).write_bytes(b"not an embedder")  # unusable: back to features
    assert order() == (["c", "b", "d"], {"features"})


# ------------------------------------------------------------------------------ CLI

def _task_dir(task, d):
    d.mkdir(parents=True)
    for name, rows in (("train.jsonl", task.support), ("valid.jsonl", task.query)):
        with open(d / name, "w") as f:
            for e in rows:
                f.write(json.dumps({"text": e.text, "label": e.label}) + "\n")
    return d


def _app():
    from metapeft.cli.tune import register

    app = typer.Typer()

    @app.command()
    def other():  # a second command keeps `tune` a subcommand
        pass

    register(app)
    return app


def test_cli_json_schema_single_objective(small_task, tmp_path):
    d = _task_dir(small_task, tmp_path / "task")
    res = CliRunner().invoke(_app(), [
        "tune", str(d), "--model", "tiny", "--methods", "lora", "--trials", "2", "--steps", "2",
        "--objectives", "accuracy", "--name", "cli", "--registry", str(tmp_path / "reg"),
        "--no-record", "--json", "--plot", str(tmp_path / "front.png")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out) == {"pareto", "recommended", "trials"}
    assert len(out["trials"]) == 2
    for t in out["trials"]:
        assert {"index", "method", "params", "config", "accuracy", "seconds", "memory_mb",
                "status", "reason"} <= set(t)
    best = max(t["accuracy"] for t in out["trials"])
    assert out["recommended"]["accuracy"] == best  # single objective: the best accuracy
    assert (tmp_path / "reg" / "studies" / "cli.safetensors").exists()
    # resume from the CLI without the task, and a one-line error for a bad space file
    res = CliRunner().invoke(_app(), ["tune", "--resume", "cli", "--trials", "3", "--registry",
                                      str(tmp_path / "reg"), "--no-record", "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout.strip().splitlines()[-1])["trials"]) == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods:\n  lora:\n    rank: {type: int, low: 0.5, high: 8}\n")
    res = CliRunner().invoke(_app(), ["tune", str(d), "--name", "b", "--space", str(bad),
                                      "--registry", str(tmp_path / "reg")])
    assert res.exit_code == 2
    assert f"{bad}:3: field 'methods.lora.rank.low'" in res.output


# ------------------------------------------------------------------------------ parallel trials

def _ring_missing() -> str | None:
    import mlx.core as mx

    from metapeft.cli.launch import launcher

    if launcher() is None:
        return "this MLX has no mlx.launch"
    if not mx.distributed.is_available("ring"):
        return "this MLX has no ring backend"
    return None


def _fake_evaluate(method, params):
    """A deterministic stand-in for adapt: accuracy peaks at lr = 1e-2."""
    lr = float(params.get("lr", 1e-3))
    return {"accuracy": max(0.0, 1.0 - abs(math.log10(lr) + 2.0) / 3.0),
            "seconds": 1.0 + float(params.get("rank", 1)) / 32, "memory_mb": 1.0}


def test_batched_suggestions_are_reproducible_distinct_and_constant_liar(tmp_path):
    """ask_batch: skopt's ask(n_points, "cl_min") on a study rebuilt from its history; the same
    seed and history give the same batch, the points differ from each other, from the history
    and from the pending ones."""
    from metapeft.tune.study import Study

    space = load_space(None, "lora")
    study = Study(name="b", path=tmp_path / "b.safetensors", space=space,
                  objectives=["accuracy", "seconds"], task={}, seed=3, n_initial=3)
    study.run(_fake_evaluate, trials=5)
    seen = {json.dumps(t["x"]) for t in study.trials}
    a = study.ask_batch(3)
    again = Study.load(study.path).ask_batch(3)
    assert [s["x"] for s in a] == [s["x"] for s in again]
    assert [s["weights"] for s in a] == [s["weights"] for s in again]
    assert len({json.dumps(s["x"]) for s in a} | seen) == len(seen) + 3
    assert [s["source"] for s in a] == ["bo"] * 3
    assert len({json.dumps(s["weights"]) for s in a}) == 1  # one ParEGO weighting per batch
    pending = [a[0]["x"]]
    b = study.ask_batch(2, pending)
    assert all(json.dumps(s["x"]) not in seen | {json.dumps(pending[0])} for s in b)
    assert [s["x"] for s in b] == [s["x"] for s in study.ask_batch(2, pending)]
    other = Study.load(study.path)
    other.seed = 4
    assert [s["x"] for s in other.ask_batch(3)] != [s["x"] for s in a]
    # the initial design: a fresh study's batch is the first LHS points, after the queue's
    fresh = Study(name="f", path=None, space=space, objectives=["accuracy"], task={}, seed=3,
                  n_initial=3)
    queue = fresh.initial_queue([])
    batch = fresh.next_batch(3, queue)
    assert [s["source"] for s in batch] == ["default", "lhs", "lhs"] and not queue


def _tune_workers(*args, timeout=300):
    import os
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "metapeft.cli", "tune", *args, "--workers", "2",
                        "--json"], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout  # rank 0 alone prints
    return json.loads(lines[0])


@pytest.mark.skipif(_ring_missing() is not None, reason=str(_ring_missing()))
def test_two_workers_run_resume_and_batch_as_the_seed_says(small_task, tmp_path):
    """tune --workers 2: two processes under mlx.launch evaluate each batch of 2; the study gets
    the asked number of trials, rank 0 writes one experience record per trial, --resume
    continues, and every batch is the one ask_batch gives for the seed and the history before
    it."""
    from metapeft.experience import ExperienceStore
    from metapeft.tune.study import Study, study_path
    from metapeft.tune.warm_start import experience_path

    d = _task_dir(small_task, tmp_path / "task")
    reg = tmp_path / "reg"
    common = ["--registry", str(reg), "--no-warm-start"]
    out = _tune_workers(str(d), "--model", "tiny", "--methods", "lora", "--trials", "4",
                        "--steps", "1", "--objectives", "accuracy", "--name", "par",
                        "--seed", "2", *common)
    assert [t["index"] for t in out["trials"]] == [0, 1, 2, 3]
    assert all(t["status"] == "ok" for t in out["trials"])
    path = study_path("par", reg)
    assert _count_trials(path) == 4
    assert len(ExperienceStore(experience_path(reg)).load()) == 4
    out = _tune_workers("--resume", "par", "--trials", "6", *common)
    study = Study.load(path)
    assert len(out["trials"]) == len(study.trials) == 6
    assert len(ExperienceStore(experience_path(reg)).load()) == 6
    trials = study.trials
    assert [t["source"] for t in trials[:2]] == ["default", "lhs"]
    # batch 1: the default point, then one asked with it pending; then batches of 2
    for first, size in ((0, 2), (2, 2), (4, 2)):
        past = Study.load(path)
        past.trials = trials[:first]
        queue = past.initial_queue([])
        batch = past.next_batch(size, queue)
        assert [s["x"] for s in batch] == [t["x"] for t in trials[first:first + size]], first
