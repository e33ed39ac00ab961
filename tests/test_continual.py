"""Continual meta-training (meta-train --init, issue 17 item 1) on the tiny model and the synthetic
families: parent/forgetting/gain recorded, the Fisher stored and ignored by loaders, EWC pulls θ
toward the parent, replay draws the parent's classes, mismatched inits refused."""

import json
from datetime import datetime, timezone

import mlx.core as mx
import pytest
from _cli import in_process
from mlx.utils import tree_flatten

from metapeft import registry as reg
from metapeft.artifacts import load_safetensors
from metapeft.data.synthetic import family_labels
from metapeft.errors import UserError

K = dict(model="tiny", ways=3, shots=2, query=2, meta_steps=4, meta_batch=2, inner_steps=2,
         eval_every=2, eval_episodes=2, val_fraction=0.34, calibrate_lr=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """c@1: meta-trained on the synthetic ``topic`` family."""
    from metapeft import api

    root = tmp_path_factory.mktemp("creg")
    api.meta_train("synthetic", name="c", registry=root, domains=["topic"], **K)
    return root


def cont(root, name="c", **kw):
    from metapeft import api

    return api.meta_train("synthetic", name=name, registry=root, domains=["intent"],
                          init="c@1", **{**K, **kw})


def test_v1_stores_its_fisher_and_loaders_ignore_it(root):
    arrays, _ = load_safetensors(reg.resolve("c@1", root))
    fisher = [k for k in arrays if k.startswith("fisher.")]
    assert fisher and all(float(arrays[k].min()) >= 0 for k in fisher)
    shown = reg.show("c@1", root)
    assert shown["num_tensors"] == len(arrays) - len(fisher)
    from metapeft.drift import load_contender
    from metapeft.models import load_base_model

    c = load_contender("c@1", load_base_model("tiny"), root)  # unflat drops fisher.*
    assert not any(k.startswith("fisher") for k, _ in tree_flatten(c.params))


def test_continue_on_another_family_records_parent_forgetting_gain(root):
    rep = cont(root, name="c")
    assert rep.version == 2
    m = reg.show("c@2", root)["metadata"]
    assert m["parent"] == "c@1"
    assert m["forgetting"]["tasks"] == 2 and m["forgetting"]["steps"] == 5
    assert m["forgetting"]["drop"] == pytest.approx(
        m["forgetting"]["accuracy_parent"] - m["forgetting"]["accuracy_new"])
    assert m["gain"]["gain"] == pytest.approx(m["gain"]["accuracy_new"]
                                              - m["gain"]["accuracy_parent"])
    assert m["continual"]["forgetting"] == "both"  # the default with --init
    assert m["continual"]["fisher"] == "stored with the parent"
    # θ started at the parent: a continuation with no forgetting control still moves from it
    assert rep.result.extra["continual"]["distance_to_parent"] > 0


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
def test_ewc_pulls_theta_toward_the_parent(root, algorithm):
    dist = {}
    for lam in (0.0, 1e4):
        rep = cont(root, name=f"e{algorithm}{int(lam)}", forgetting="ewc", ewc_lambda=lam,
                   algorithm=algorithm, **({"outer_lr": 0.05} if algorithm == "fomaml" else {}))
        dist[lam] = rep.result.extra["continual"]["distance_to_parent"]
    assert dist[1e4] < 0.8 * dist[0.0], dist


def test_replay_draws_tasks_from_the_parents_classes(root):
    rep = cont(root, name="r", forgetting="replay", replay_fraction=0.5)
    replay = rep.result.extra["replay"]
    assert replay["tasks_per_step"] == 1
    labels = set(replay["labels"])
    parent_train = set(reg.show("c@1", root)["metadata"]["data"]["train_classes"])
    assert labels and labels <= parent_train
    assert not labels & set(family_labels("intent"))
    none = cont(root, name="n", forgetting="none")
    assert "replay" not in none.result.extra


def test_parent_without_fisher_gets_it_computed(root):
    arrays, meta = load_safetensors(reg.resolve("c@1", root))
    bare = {k: v for k, v in arrays.items() if not k.startswith("fisher.")}
    reg.save_version("bare", bare, meta, root)
    from metapeft import api

    rep = api.meta_train("synthetic", name="bare", registry=root, domains=["intent"],
                         init="bare@1", forgetting="ewc", **K)
    assert rep.result.extra["continual"]["settings"]["fisher"].startswith("computed now")


def test_unreachable_parent_data_falls_back_to_ewc(root, tmp_path):
    from metapeft import api
    from metapeft.meta.sources import synthetic_pool

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n"
                            for e in synthetic_pool() if e.extra["domain"] == "topic"))
    api.meta_train(str(pool), name="gone", registry=root, **K)
    pool.unlink()
    rep = api.meta_train("synthetic", name="gone", registry=root, domains=["intent"],
                         init="gone@1", forgetting="replay", **K)
    s = rep.result.extra["continual"]
    assert "replay" not in rep.result.extra
    assert s["settings"]["ewc_lambda"] is not None  # EWC instead
    assert any("not reachable" in n for n in s["settings"]["notes"])
    assert s["forgetting"] is None and s["gain"] is not None


def test_mismatched_init_is_refused(root):
    from metapeft import api

    with pytest.raises(UserError, match="cannot continue from c@1") as e:
        cont(root, name="x", method="prompt")
    assert e.value.field == "init"
    with pytest.raises(UserError, match="cannot continue from c@1.*shape"):
        cont(root, name="x", config={"rank": 4})
    with pytest.raises(UserError, match="needs --init"):
        api.meta_train("synthetic", name="x", registry=root, forgetting="ewc", **K)
    assert reg.list_versions("x", root) == []


def test_cli_init_refusal_exits_2_and_show_prints_forgetting(root):
    env = {"METAPEFT_RUNS": "off"}
    bad = in_process("meta-train", "--model", "tiny", "--name", "c", "--registry", root, "--init",
                     "c@1", "--method", "prompt", "--meta-steps", "1", "--ways", "3", env=env)
    assert bad.returncode == 2 and "cannot continue from c@1" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    shown = in_process("weights", "show", "c@2", "--registry", root, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "parent      c@1" in shown.stdout
    assert "forgetting" in shown.stdout and "gain" in shown.stdout
    js = in_process("meta-train", "--model", "tiny", "--name", "cj", "--registry", root, "--init",
                    "c@1", "--domains", "intent", "--ways", "3", "--shots", "2", "--query", "2",
                    "--meta-steps", "2", "--meta-batch", "2", "--inner-steps", "2",
                    "--eval-episodes", "2", "--val-fraction", "0.34", "--no-calibrate-lr",
                    "--forgetting", "ewc", "--ewc-lambda", "10", "--json", env=env)
    assert js.returncode == 0, js.stderr
    obj = json.loads(js.stdout)
    assert obj["parent"] == "c@1" and obj["continual"]["ewc_lambda"] == 10
    assert set(obj["forgetting"]) >= {"drop", "accuracy_parent", "accuracy_new"}


def test_feedback_since_keeps_recent_rows():
    from metapeft.data import Example
    from metapeft.data.feedback import filter_since

    rows = [Example(text="a", label="x", extra={"timestamp": "2024-01-01T00:00:00"}),
            Example(text="b", label="x", extra={"timestamp": 1735689600}),  # 2025-01-01
            Example(text="c", label="x", extra={})]
    kept, undated = filter_since(rows, datetime(2024, 6, 1, tzinfo=timezone.utc))
    assert [e.text for e in kept] == ["b"] and undated == 1
    with pytest.raises(UserError, match="task-strategy"):
        from metapeft.meta.sources import build_meta_sources

        build_meta_sources("synthetic", since=datetime(2024, 6, 1, tzinfo=timezone.utc))


def test_anchor_gradient_and_capped_pull():
    from metapeft.meta.continual import Anchor

    parent = {"w": mx.zeros((4,))}
    a = Anchor.make(parent, {"w": mx.array([0.0, 1.0, 2.0, 1.0])}, lam=0.5)
    theta = {"w": mx.ones((4,))}
    assert a.gradient(theta)["w"].tolist() == pytest.approx([0.0, 1.0, 2.0, 1.0])
    assert a.pull(theta, eps=1.0)["w"].tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0])
    assert a.penalty(theta) == pytest.approx(2.0)


def test_continue_on_a_feedback_log_since_a_date(root, tmp_path):
    from datetime import timedelta

    from metapeft import api

    base = datetime(2024, 3, 4, 9, 0, tzinfo=timezone.utc)
    labels = family_labels("intent")[:3]
    from metapeft.data.synthetic import generate_pool

    pool = [e for e in generate_pool("intent", 0, 40) if e.label in labels]
    log = tmp_path / "fb.jsonl"
    log.write_text("".join(json.dumps({
        "text": e.text, "label": e.label, "project": ["alpha", "beta", "gamma"][i % 3],
        "timestamp": (base + timedelta(days=i % 20)).isoformat()}) + "\n"
        for i, e in enumerate(pool)))
    rep = api.meta_train(str(log), name="fb", registry=root, task_strategy="project",
                         since=base + timedelta(days=10), init="c@1", min_samples=10,
                         **{**K, "val_fraction": 0.34})
    spec = reg.show(f"fb@{rep.version}", root)["metadata"]["data"]
    assert spec["rows_since"]["kept"] < spec["rows_since"]["of"] == len(pool)
    m = reg.show(f"fb@{rep.version}", root)["metadata"]
    assert m["parent"] == "c@1" and m["forgetting"] is not None


def test_cli_since_and_days():
    from metapeft.cli.meta import _since

    assert _since("2024-06-01", None) == datetime(2024, 6, 1, tzinfo=timezone.utc)
    assert _since(None, None) is None
    assert round((datetime.now(timezone.utc) - _since(None, 3)).total_seconds() / 86400) == 3
    for args in (("2024-06-01", 3), ("last week", None), (None, 0)):
        with pytest.raises(UserError):
            _since(*args)
