"""Meta-learning: MAML's second-order gradient against finite differences, vectorised equals
sequential, Reptile's update rule, checkpoint/resume, divergence handling, class disjointness."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from metapeft.adapters import get_adapter_class
from metapeft.data.synthetic import generate_task
from metapeft.meta.batch import encode_episode, stack_episodes
from metapeft.meta.learner import MetaConfig, MetaLearner, inner_adapt, task_contribution
from metapeft.train import batch_loss


def episodes(tok, n=3, seed=0, family="topic"):
    return [encode_episode(generate_task(seed + s, family=family, ways=3, shots=2, query=2,
                                         length=6), tok) for s in range(n)]


def perturbed(adapter, scale=0.05):
    th = adapter.init_params(0)
    return tree_map(lambda x: x + scale * mx.random.normal(x.shape, key=mx.random.key(1)), th)


def directional(tree_a, direction):
    fa = dict(tree_flatten(tree_a))
    return sum(float((fa[k] * d).sum()) for k, d in direction.items())


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_maml_gradient_matches_finite_differences(tiny, method):
    ad = get_adapter_class(method).attach(tiny)
    th = perturbed(ad)
    (e,) = episodes(tiny.tokenizer, 1)
    cfg = MetaConfig(algorithm="maml", inner_steps=2, inner_lr=0.1, inner_optimizer="sgd")
    _, _, g = task_contribution(ad, cfg, th, e.support, e.query)
    flat = tree_flatten(th)
    keys = mx.random.split(mx.random.key(5), len(flat))
    d = {k: mx.random.normal(v.shape, key=keys[i]) for i, (k, v) in enumerate(flat)}

    def outer(params):
        return batch_loss(ad, inner_adapt(ad, params, e.support, cfg), e.query).item()

    h = 1e-3
    plus = tree_unflatten([(k, v + h * d[k]) for k, v in flat])
    minus = tree_unflatten([(k, v - h * d[k]) for k, v in flat])
    fd = (outer(plus) - outer(minus)) / (2 * h)
    an = directional(g, d)
    assert abs(an - fd) <= 0.02 * abs(fd) + 1e-3, (an, fd)
    # and the second-order term is real: first-order MAML's gradient is measurably further from
    # the finite difference than MAML's. The gap is a few percent of |fd| at this inner lr, so it is
    # judged against MAML's own error, not against a fixed fraction of |fd| (that flaked in CI).
    _, _, g1 = task_contribution(ad, MetaConfig(algorithm="fomaml", inner_steps=2, inner_lr=0.1,
                                                inner_optimizer="sgd"), th, e.support, e.query)
    if method == "lora":
        first_order = directional(g1, d)
        assert abs(first_order - fd) > 5 * abs(an - fd) and abs(first_order - an) > 1e-3, \
            (an, first_order, fd)


@pytest.mark.parametrize("compile_", [False, True], ids=["vmap", "vmap+compile"])
@pytest.mark.parametrize("algorithm", ["reptile", "fomaml", "maml"])
def test_vectorised_equals_sequential(tiny, algorithm, compile_):
    """The vmapped meta-step (with and without mx.compile; without is the CLI's default) equals
    the sequential loop, and really ran vectorised where that is claimed. Second-order MAML falls
    back (MLX cannot vmap the VJP of mlx-lm's compiled activations), which is recorded, not hidden:
    if a future MLX vmaps it, the vectorised result is compared too."""
    ad = get_adapter_class("lora").attach(tiny)
    th = perturbed(ad)
    eps = episodes(tiny.tokenizer, 3, seed=10, family="urgency")  # 2-token labels: both passes
    S, Q = stack_episodes(eps)
    cfg = dict(algorithm=algorithm, inner_steps=2, inner_lr=0.01,
               inner_optimizer="sgd" if algorithm == "maml" else "adam",
               outer_lr=0.5 if algorithm == "reptile" else 1e-1, outer_optimizer="sgd")
    out, learners = [], []
    for vec in (False, True):
        ml = MetaLearner(ad, MetaConfig(**cfg), vectorise=vec, compile=compile_)
        ml.init_outer(th)
        out.append(ml.step(th, [(S, Q)], 0, 10))
        learners.append(ml)
    sequential, vectorised = learners
    assert sequential.vectorised_groups == 0
    if algorithm == "maml":
        assert vectorised.vectorised_groups == 1 or vectorised.fallback_reason
    else:
        assert vectorised.vectorised_groups == 1, vectorised.fallback_reason
    (t0, l0, a0), (t1, l1, a1) = out
    assert abs(l0 - l1) < 1e-4 and abs(a0 - a1) < 1e-6
    for (k, v0), (_, v1) in zip(tree_flatten(t0), tree_flatten(t1)):
        assert np.allclose(np.array(v0), np.array(v1), rtol=1e-3, atol=1e-4), k


def test_reptile_update_rule(tiny):
    """θ' = θ + ε_t · mean(φ_i − θ) with ε_t = ε0 (1 − t/T)."""
    ad = get_adapter_class("prompt").attach(tiny)
    th = ad.init_params(0)
    eps = episodes(tiny.tokenizer, 2)
    cfg = MetaConfig(algorithm="reptile", inner_steps=2, inner_lr=0.01, outer_lr=0.8)
    phis = [inner_adapt(ad, th, e.support, cfg) for e in eps]
    ml = MetaLearner(ad, cfg, vectorise=False)
    new, _, _ = ml.step(th, [stack_episodes(eps)], 5, 20)
    eps_t = 0.8 * (1 - 5 / 20)
    want = th["prompt"] + eps_t * ((phis[0]["prompt"] - th["prompt"]) +
                                  (phis[1]["prompt"] - th["prompt"])) / 2
    assert np.allclose(np.array(new["prompt"]), np.array(want), atol=1e-5)


def test_vmap_mask_regression():
    """MLX 0.32 mis-broadcasts `&` under vmap; the scorer must use logical_and (see base.py)."""
    L = 5
    pos = mx.arange(L)
    causal = pos[:, None] >= pos[None, :]
    plen = mx.array([[3, 5], [5, 2]])
    f = lambda p: mx.logical_and(causal[None], (pos[None, :] < p[:, None])[:, None, :])
    r = mx.vmap(f)(plen)
    ref = mx.stack([f(plen[i]) for i in range(2)])
    assert r.shape == ref.shape and bool(mx.all(r == ref))


def run_cli(*args, home):
    env = {**os.environ, "METAPEFT_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "metapeft.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600)


COMMON = ["--ways", "3", "--shots", "2", "--query", "2", "--inner-steps", "2", "--meta-batch", "2",
          "--eval-every", "2", "--eval-episodes", "2"]


class Killed(Exception):
    pass


def killed_run(**kw) -> None:
    """``api.meta_train`` on the synthetic pool, "killed" (a callback that raises) after the
    second meta-step, with a checkpoint every step: what ``--resume`` continues."""
    from metapeft import api

    def killer(t, *a):
        if t == 2:
            raise Killed

    with pytest.raises(Killed):
        api.meta_train("synthetic", checkpoint_every=1, on_step=killer, **kw)


def test_cli_resume_shows_the_bar_from_the_checkpoint_step(tmp_path):
    """A resumed run's progress starts where its checkpoint is, not at 0/4."""
    from metapeft import registry as reg
    from metapeft.artifacts import read_metadata

    home = tmp_path / "home"
    killed_run(name="b", registry=home, ways=3, shots=2, query=2, inner_steps=2, meta_batch=2,
               meta_steps=4, eval_every=2, eval_episodes=2, seed=3, calibrate_lr=False)
    step = int(read_metadata(reg.checkpoint_path("b", home))["step"])
    assert 0 < step < 4
    r = run_cli("meta-train", "--data", "synthetic", "--name", "b", "--resume", *COMMON,
                "--meta-steps", "4", "--seed", "3", "--no-calibrate-lr", home=home)
    assert r.returncode == 0, r.stderr
    started = [ln for ln in (r.stdout + r.stderr).splitlines() if "started" in ln]
    assert started and f" {step}/4 " in started[0], r.stdout + r.stderr


def test_meta_train_publish_resume_and_adapt(tmp_path):
    # a run "killed" after 2 of 4 meta-steps, then resumed through the api
    from metapeft import api
    from metapeft import registry as reg

    home = tmp_path / "home"
    kw = dict(name="r", registry=home, ways=3, shots=2, query=2, inner_steps=2, meta_batch=2,
              meta_steps=4, eval_every=2, eval_episodes=2, seed=3)
    killed_run(**kw)
    ck = reg.checkpoint_path("r", home)
    assert ck.exists() and not reg.list_versions("r", home)
    resumed = api.meta_train("synthetic", resume=True, **kw)
    full = api.meta_train("synthetic", **{**kw, "name": "full"})
    assert resumed.meta_losses == pytest.approx(full.meta_losses, abs=1e-4)
    assert resumed.version == 1 and not ck.exists()
    meta = reg.show("r", home)
    blob = json.dumps(meta)
    for key in ("algorithm", "base_model_hash", "num_tasks", "meta_loss", "val_accuracy",
                "train_classes", "created", "duration_seconds"):
        assert key in blob, key
    # the published weights initialise adapt; a mismatched method is refused
    task = tmp_path / "task"
    from metapeft.quickstart import write_task_dir

    write_task_dir(generate_task(99, family="intent", ways=3, shots=2, query=2), task)
    ok = run_cli("adapt", str(task), "--steps", "1", "--init", "r", "--json", home=home)
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("adapt", str(task), "--steps", "1", "--init", "r@1", "--method", "prompt",
                  home=home)
    assert bad.returncode == 2 and "method" in bad.stderr


def test_divergence_stops_and_keeps_checkpoint(tmp_path):
    from metapeft import api
    from metapeft import registry as reg
    from metapeft.meta.run import MetaDivergence

    home = tmp_path / "home"
    kw = dict(name="nan", registry=home, ways=3, shots=2, query=2, inner_steps=1, meta_batch=2,
              eval_every=0, checkpoint_every=1)
    api.meta_train("synthetic", meta_steps=1, **kw)  # publishes v1, removes the checkpoint
    with pytest.raises(MetaDivergence, match="meta-loss"):
        api.meta_train("synthetic", meta_steps=3, algorithm="fomaml", outer_lr=1e30,
                       inner_lr=1e30, **kw)
    assert reg.list_versions("nan", home) == [1]


def test_meta_train_classes_disjoint_from_held_out(tmp_path):
    from metapeft import api
    from metapeft.data.synthetic import family_labels

    tr, va, spec, _ = api.build_meta_sources("synthetic", exclude_domains=["intent"], ways=3,
                                             shots=2, query=2)
    held_out = set(family_labels("intent"))
    assert not set(spec["train_classes"]) & held_out and not set(spec["val_classes"]) & held_out
    assert not set(spec["train_classes"]) & set(spec["val_classes"])
    for s in range(20):
        assert not set(tr.sample(s).labels) & held_out


def test_val_domains_hold_whole_domains_out_for_validation():
    """--val-domains: the validation classes are exactly the named domains' classes (as a
    held-out-domain meta-test), disjoint from the meta-train classes, and validation episodes
    draw only from them; without it, validation classes come from every domain."""
    from metapeft import api
    from metapeft.data.synthetic import family_labels
    from metapeft.errors import UserError

    tr, va, spec, _ = api.build_meta_sources("synthetic", val_domains=["intent", "sentiment"],
                                             exclude_domains=["topic"], ways=3, shots=2, query=2)
    held = set(family_labels("intent")) | set(family_labels("sentiment"))
    assert set(spec["val_classes"]) == held and spec["val_domains"] == ["intent", "sentiment"]
    assert not set(spec["train_classes"]) & held and not set(spec["train_classes"]) & set(
        family_labels("topic"))
    for s in range(10):
        assert set(va.sample(s).labels) <= held and not set(tr.sample(s).labels) & held
    _, _, by_fraction, _ = api.build_meta_sources("synthetic", ways=3, shots=2, query=2)
    assert not set(by_fraction["val_classes"]) <= held  # the default mixes every domain
    for kw, needle in (({"val_domains": ["nope"]}, "unknown validation domain"),
                       ({"val_domains": ["intent"], "exclude_domains": ["intent"]},
                        "both excluded and validation"),
                       ({"val_domains": ["intent"], "domains": ["intent"]},
                        "0 meta-train and")):
        with pytest.raises(UserError, match=needle) as e:
            api.build_meta_sources("synthetic", ways=3, shots=2, query=2, **kw)
        assert e.value.field == "val_domains"


def test_val_domains_refuse_a_label_on_both_sides(tmp_path):
    from metapeft.data import Example, split_classes_by_domain
    from metapeft.errors import UserError

    pool = [Example(f"t{i}", lab, extra={"domain": dom}) for i, (lab, dom) in enumerate(
        [("a", "x"), ("b", "x"), ("c", "y"), ("d", "y"), ("a", "y")])]
    with pytest.raises(UserError, match="both inside and outside"):
        split_classes_by_domain(pool, ["x"])
    assert split_classes_by_domain(pool[:4], ["x"]) == (["c", "d"], ["a", "b"])


def test_replay_stats_cli(tmp_path):
    log = tmp_path / "fb.jsonl"
    rows = [{"text": f"t{i}", "label": "ab"[i % 2], "project": "p", "intent": "i",
             "timestamp": "2026-01-05T00:00:00", "rating": [-1, 1, -0.5, 0][i % 4]}
            for i in range(40)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli("meta-train", "--data", str(log), "--name", "x", "--replay-stats", "--json",
                home=tmp_path)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["counts"]["failed"] == 10 and stats["weights"]["failed"] == 3.0


def test_weights_cli(tmp_path):
    from metapeft import api

    home = tmp_path / "home"
    kw = dict(registry=home, ways=3, shots=2, query=2, inner_steps=1, meta_batch=2, meta_steps=1,
              eval_every=0)
    api.meta_train("synthetic", name="w", **kw)
    api.meta_train("synthetic", name="w", seed=1, **kw)
    rows = json.loads(run_cli("weights", "list", "--json", home=home).stdout)
    assert [(r["name"], r["version"], r["latest"]) for r in rows] == [("w", 1, False), ("w", 2, True)]
    cmp = json.loads(run_cli("weights", "compare", "w@1", "w@2", "--json", home=home).stdout)
    assert cmp["compatible"] and cmp["l2_distance"] > 0
    assert run_cli("weights", "rollback", "w", "1", home=home).returncode == 0
    shown = json.loads(run_cli("weights", "show", "w", "--json", home=home).stdout)
    assert shown["version"] == 1
    bad = run_cli("weights", "show", "nope@3", home=home)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_adapt_lr_is_calibrated_on_validation_and_used_by_adapt(tmp_path):
    """meta-train publishes the test-time lr it chose on its validation tasks (the best mean
    accuracy over the marks, every candidate's row kept); adapt --init uses it unless --lr is
    given."""
    from metapeft import api
    from metapeft import registry as reg

    home = tmp_path / "home"
    trials = []
    res = api.meta_train("synthetic", name="c", registry=home, ways=3, shots=2, query=2,
                         inner_steps=2, meta_batch=2, meta_steps=2, eval_every=2, eval_episodes=2,
                         calibrate_decays=(0.0,),  # constant lrs only (decays: the test below)
                         on_calibrate=lambda f, row: trials.append((f, row["mean"])))
    cal = res.result.extra["adapt_lr"]
    assert [f for f, _ in trials] == ["2.0", "1.0", "0.5", "0.2"] and cal["num_tasks"] == 2
    best = max(m for _, m in trials)
    assert cal["table"][str(cal["factor"])]["mean"] == best
    assert cal["adapt_lr"] == pytest.approx(cal["base_lr"] * cal["factor"])
    meta = reg.show("c", home)["metadata"]
    assert float(meta["adapt_lr"]) == pytest.approx(cal["adapt_lr"])
    assert meta["adapt_lr_calibration"]["factor"] == cal["factor"]
    from metapeft.quickstart import write_task_dir

    task = tmp_path / "task"
    write_task_dir(generate_task(7, family="intent", ways=3, shots=2, query=2), task)
    used = api.adapt(str(task), steps=1, init=res.path)
    assert used.extra["lr"] == pytest.approx(cal["adapt_lr"])
    assert api.adapt(str(task), steps=1, init=res.path, lr=5e-4).extra["lr"] == 5e-4
    assert api.adapt(str(task), steps=1).extra["lr"] == get_adapter_class("lora").default_lr
    shown = run_cli("weights", "show", "c", home=home)
    assert shown.returncode == 0 and "adapt lr" in shown.stdout
    # every candidate shown, the chosen one marked
    assert shown.stdout.count("(chosen)") == 1, shown.stdout
    assert f"x{cal['factor']} {best:.1%} (chosen)" in shown.stdout, shown.stdout
    assert sum(f"x{f} " in shown.stdout for f, _ in trials) == len(trials)
    assert "points over x" in shown.stdout and "(paired, 2 tasks)" in shown.stdout


def test_defaults_are_each_model_sizes_measured_recipe(tmp_path, tiny, monkeypatch):
    """meta-train's defaults (API and CLI alike) follow the base model's size: under 10M
    parameters (stories260K, the tiny model) 30 meta-steps and every lr factor constant and with
    an inverse-time decay of 1 on the early-stopping episodes; from 10M (SmolLM2-135M) 10
    meta-steps and x1/x0.5 with decays 1 and 3 on 24 validation tasks. An explicit value wins;
    the resolved values reach the progress bar, the calibration and the published version."""
    from metapeft import api, config
    from metapeft.artifacts import read_metadata

    assert tiny.num_parameters == sum(v.size for _, v in tree_flatten(tiny.model.parameters()))
    small, large = config.recipe_for(260_032), config.recipe_for(134_515_008)  # stories, SmolLM2
    assert (small["meta_steps"], small["lr_factors"], small["lr_decays"],
            small["calibrate_tasks"]) == (30, (2.0, 1.0, 0.5, 0.2), (0.0, 1.0), None)
    assert (large["meta_steps"], large["lr_factors"], large["lr_decays"],
            large["calibrate_tasks"]) == (10, (1.0, 0.5), (1.0, 3.0), 24)
    shown = " ".join(run_cli("meta-train", "--help", home=tmp_path).stdout.split())
    for text in ("[default: 30; 10 for models of 10M+ parameters]",
                 "[default: 0,1; 1,3 for models of 10M+ parameters]",
                 "[default: 2,1,0.5,0.2; 1,0.5 for models of 10M+ parameters]",
                 "[default: --eval-episodes; 24 for models of 10M+ parameters]"):
        assert text in shown, shown

    monkeypatch.setattr(config, "LARGE_MODEL_PARAMETERS", 1000)  # the tiny model is "large"
    monkeypatch.setattr(config, "LARGE_MODEL_RECIPE", {"meta_steps": 2, "lr_factors": (1.0,),
                                                       "lr_decays": (3.0,), "calibrate_tasks": 2})
    started = []
    kw = dict(registry=tmp_path / "reg", ways=3, shots=2, query=2, meta_batch=1, inner_steps=1,
              eval_episodes=1, on_start=started.append)
    res = api.meta_train("synthetic", name="size", **kw)
    assert started == [2] and res.result.steps_done == 2
    assert json.loads(read_metadata(res.path)["hyperparameters"])["meta_steps"] == 2
    cal = res.result.extra["adapt_lr"]
    assert (cal["num_tasks"], cal["factor"], cal["adapt_lr_decay"]) == (2, 1.0, 3.0)
    res = api.meta_train("synthetic", name="size", meta_steps=1, calibrate_decays=(0.0,), **kw)
    assert started == [2, 1] and res.result.steps_done == 1
    assert res.result.extra["adapt_lr"]["adapt_lr_decay"] == 0.0


def test_calibration_adapts_calibrate_tasks_validation_tasks(tmp_path):
    """--calibrate-tasks N calibrates on N validation tasks (default: the --eval-episodes early
    stopping uses); N < 1 is a one-line error, exit 2."""
    from metapeft import api

    kw = dict(registry=tmp_path / "reg", ways=3, shots=2, query=2, meta_steps=1, meta_batch=1,
              inner_steps=1, eval_episodes=1, calibrate_decays=(0.0,))
    assert api.meta_train("synthetic", name="c1", **kw).result.extra["adapt_lr"]["num_tasks"] == 1
    res = api.meta_train("synthetic", name="c3", calibrate_tasks=3, **kw)
    assert res.result.extra["adapt_lr"]["num_tasks"] == 3
    for option, value, message in (("--calibrate-tasks", "0", "--calibrate-tasks must be >= 1"),
                                   ("--lr-factors", "1,0", "--lr-factors must be comma-separated "
                                                           "numbers > 0 (got '1,0')"),
                                   ("--calibrate-horizons", "5,0", "--calibrate-horizons must be "
                                                                   "comma-separated numbers > 0"),
                                   ("--calibrate-horizons", "2.5", "--calibrate-horizons must be "
                                                                   "whole numbers of steps")):
        bad = run_cli("meta-train", "--name", "c0", *COMMON, "--meta-steps", "1", option, value,
                      home=tmp_path)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_calibration_never_picks_a_diverging_lr(tiny):
    """A candidate lr that blows the adapter up scores nothing; the others are compared."""
    from metapeft.meta.stepsize import calibrate_adapt_lr

    adapter = get_adapter_class("lora").attach(tiny, {})
    tasks = [generate_task(s, family="intent", ways=3, shots=2, query=2) for s in (1, 2)]
    cal = calibrate_adapt_lr(adapter, adapter.init_params(0), tasks, 1e-3,
                             factors=(1e9, 1.0), marks=(1, 2))
    assert cal["factor"] == 1.0 and cal["table"]["1000000000.0"]["diverged"]


def test_calibration_reports_the_choice_paired_lead_over_the_runner_up(tiny):
    """Each candidate keeps its per-task means (over the marks); the result says by how much,
    task by task, the chosen candidate led the runner-up, so a tie on few tasks shows as one."""
    from metapeft.meta.stepsize import calibrate_adapt_lr, candidate_key

    adapter = get_adapter_class("lora").attach(tiny, {})
    tasks = [generate_task(s, family="intent", ways=3, shots=2, query=2) for s in (1, 2, 3)]
    cal = calibrate_adapt_lr(adapter, adapter.init_params(0), tasks, 1e-3,
                             factors=(1.0, 8.0), decays=(0.0, 1.0), marks=(1, 2))
    table = cal["table"]
    for row in table.values():
        assert len(row["tasks"]) == 3
        assert row["mean"] == pytest.approx(np.mean(row["tasks"]), abs=1e-5)
    chosen = candidate_key(cal["factor"], cal["adapt_lr_decay"])
    margin = cal["margin"]
    others = [k for k in table if k != chosen]
    assert margin["over"] in others
    assert table[margin["over"]]["mean"] == max(table[k]["mean"] for k in others)
    lead = np.subtract(table[chosen]["tasks"], table[margin["over"]]["tasks"])
    assert margin["mean"] == pytest.approx(lead.mean(), abs=1e-5) and margin["mean"] >= -1e-6
    assert margin["ci95"] == pytest.approx(1.96 * lead.std(ddof=1) / np.sqrt(3), abs=1e-5)
    one = calibrate_adapt_lr(adapter, adapter.init_params(0), tasks[:1], 1e-3, factors=(1.0, 0.5),
                             marks=(1,))
    assert one["margin"]["ci95"] is None  # one task: no spread to read a CI from
    assert calibrate_adapt_lr(adapter, adapter.init_params(0), tasks[:1], 1e-3, factors=(1.0,),
                              marks=(1,))["margin"] is None


def test_calibration_horizons_choose_by_the_accuracy_at_their_step(tiny):
    """A horizon is one more reading of the same curves: the overall choice (the marks' mean)
    is what it is without horizons, and horizon h's choice is the best mean accuracy at step h,
    with its own paired margin read from each task's accuracy at h."""
    from metapeft.meta.stepsize import calibrate_adapt_lr, candidate_key

    adapter = get_adapter_class("lora").attach(tiny, {})
    tasks = [generate_task(s, family="intent", ways=3, shots=2, query=2) for s in (1, 2, 3)]
    grid = dict(factors=(0.2, 1.0, 8.0), decays=(0.0, 1.0), marks=(1, 2))
    plain = calibrate_adapt_lr(adapter, adapter.init_params(0), tasks, 1e-3, **grid)
    cal = calibrate_adapt_lr(adapter, adapter.init_params(0), tasks, 1e-3, horizons=(4,), **grid)
    assert "horizons" not in plain
    assert (cal["factor"], cal["adapt_lr_decay"]) == (plain["factor"], plain["adapt_lr_decay"])
    for key, row in cal["table"].items():  # the marks' readings are the same runs'
        assert row["mean"] == pytest.approx(plain["table"][key]["mean"], abs=1e-6)
        assert "4" not in plain["table"][key] and len(row["tasks_at"]["4"]) == 3
        assert row["4"] == pytest.approx(np.mean(row["tasks_at"]["4"]), abs=1e-5)
    h = cal["horizons"]["4"]
    best = max(cal["table"][k]["4"] for k in cal["table"])
    assert cal["table"][candidate_key(h["factor"], h["adapt_lr_decay"])]["4"] == best
    assert h["adapt_lr"] == pytest.approx(1e-3 * h["factor"])
    over = cal["table"][h["margin"]["over"]]["tasks_at"]["4"]
    lead = np.subtract(cal["table"][candidate_key(h["factor"], h["adapt_lr_decay"])]
                       ["tasks_at"]["4"], over)
    assert h["margin"]["mean"] == pytest.approx(lead.mean(), abs=1e-5)
    with pytest.raises(ValueError, match="horizons"):
        calibrate_adapt_lr(adapter, adapter.init_params(0), tasks, 1e-3, horizons=(0,), **grid)


def test_a_run_takes_the_step_size_calibrated_for_its_length():
    """The smallest calibrated horizon at or past the run's steps; the overall choice stands
    for the marks' last step; past every horizon, the longest; none stored, the overall."""
    from metapeft.meta.stepsize import schedule_for_steps

    cal = {"adapt_lr": 1e-3, "adapt_lr_decay": 1.0, "marks": [1, 2, 5, 10],
           "horizons": {"5": {"adapt_lr": 2e-3, "adapt_lr_decay": 0.0},
                        "50": {"adapt_lr": 5e-4, "adapt_lr_decay": 3.0}}}
    want = {1: (2e-3, 0.0, 5), 5: (2e-3, 0.0, 5), 6: (1e-3, 1.0, None), 10: (1e-3, 1.0, None),
            11: (5e-4, 3.0, 50), 50: (5e-4, 3.0, 50), 400: (5e-4, 3.0, 50)}
    for steps, (lr, decay, horizon) in want.items():
        got = schedule_for_steps(cal, steps)
        assert (got["adapt_lr"], got["adapt_lr_decay"], got["horizon"]) == (lr, decay, horizon), steps
    bare = {k: v for k, v in cal.items() if k != "horizons"}
    assert schedule_for_steps(bare, 50) == {"adapt_lr": 1e-3, "adapt_lr_decay": 1.0,
                                            "horizon": None}


def test_adapt_from_an_init_uses_its_horizon_step_size(tiny, tmp_path):
    """``adapt --init`` reads the calibration in the init's header: a 3-step run takes the
    3-step choice, a 10-step run the overall one, and the report says when it took a horizon's."""
    import json

    from metapeft import api
    from metapeft.artifacts import save_safetensors

    adapter = get_adapter_class("lora").attach(tiny, {})
    cal = {"adapt_lr": 1e-3, "factor": 1.0, "adapt_lr_decay": 0.0, "base_lr": 1e-3,
           "marks": [1, 2, 5, 10], "table": {},
           "horizons": {"3": {"adapt_lr": 4e-3, "factor": 4.0, "adapt_lr_decay": 1.0,
                              "margin": None}}}
    init = tmp_path / "init.safetensors"
    save_safetensors(init, dict(tree_flatten(adapter.init_params(0))),
                     {"adapt_lr": "0.001", "adapt_lr_calibration": json.dumps(cal)})
    task = generate_task(4, family="intent", ways=3, shots=2, query=2)
    short = api.adapt(task, model="tiny", init=str(init), steps=3, target=None)
    long = api.adapt(task, model="tiny", init=str(init), steps=10, target=None)
    assert short.to_json()["step_size"] == {"lr": 4e-3, "lr_decay": 1.0, "horizon": 3,
                                            "source": "init calibration"}
    assert (short.extra["lr"], short.extra["lr_decay"]) == (4e-3, 1.0)
    assert "step_size" not in long.to_json()  # the overall choice: the documented keys only
    assert long.extra["lr"] == 1e-3 and "lr_decay" not in long.extra


def test_lr_decay_keeps_the_first_step_and_scales_the_later_ones(tiny):
    """Inverse-time decay: update 1 runs at the full lr, update t at lr / (1 + d(t-1)). Adam's
    second update from the same point is the same direction, so with d = 1 it is exactly half."""
    from metapeft.train import encode_task, train

    adapter = get_adapter_class("lora").attach(tiny, {})
    data = encode_task(generate_task(3, family="intent", ways=3, shots=2, query=2), tiny.tokenizer)
    init = adapter.init_params(0)
    flat = lambda p: np.concatenate([np.asarray(v).ravel() for _, v in tree_flatten(p)])
    run = lambda steps, d: flat(train(adapter, init, data, steps=steps, lr=1e-3, lr_decay=d,
                                      evaluate_query=False).params)
    one_const, one_decay = run(1, 0.0), run(1, 1.0)
    np.testing.assert_allclose(one_decay, one_const, atol=1e-7)
    second_const = run(2, 0.0) - one_const
    second_decay = run(2, 1.0) - one_decay
    assert np.abs(second_const).max() > 1e-5
    np.testing.assert_allclose(second_decay, 0.5 * second_const, atol=1e-6)


def test_calibrated_lr_decay_is_published_and_used_by_adapt(tmp_path):
    """With decays to try, every (factor, decay) pair is a candidate; the chosen decay goes into
    the header (adapt_lr_decay) and adapt --init applies it unless --lr or --lr-decay says
    otherwise. A bad --lr-decays is a one-line error (exit 2)."""
    from metapeft import api
    from metapeft import registry as reg
    from metapeft.quickstart import write_task_dir

    home = tmp_path / "home"
    trials = []
    res = api.meta_train("synthetic", name="d", registry=home, ways=3, shots=2, query=2,
                         inner_steps=2, meta_batch=2, meta_steps=2, eval_every=2, eval_episodes=2,
                         calibrate_decays=(0.5,),
                         on_calibrate=lambda k, row: trials.append(k))
    cal = res.result.extra["adapt_lr"]
    assert trials == ["2.0/decay0.5", "1.0/decay0.5", "0.5/decay0.5", "0.2/decay0.5"]
    assert cal["adapt_lr_decay"] == 0.5
    assert float(reg.show("d", home)["metadata"]["adapt_lr_decay"]) == 0.5
    shown = run_cli("weights", "show", "d", home=home)
    assert "decaying as 1/(1 + 0.5(t-1))" in shown.stdout
    task = tmp_path / "task"
    write_task_dir(generate_task(7, family="intent", ways=3, shots=2, query=2), task)
    assert api.adapt(str(task), steps=1, init=res.path, out=tmp_path / "a").extra["lr_decay"] == 0.5
    from metapeft.adapter_io import read_adapter_info

    assert read_adapter_info(tmp_path / "a").provenance["lr_decay"] == 0.5  # reproducible
    assert "lr_decay" not in api.adapt(str(task), steps=1, init=res.path, lr=5e-4).extra
    assert "lr_decay" not in api.adapt(str(task), steps=1, init=res.path, lr_decay=0.0).extra
    bad = run_cli("meta-train", "--name", "e", "--lr-decays", "0,-1", "--meta-steps", "1",
                  home=home)
    assert bad.returncode == 2 and "--lr-decays" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
