"""The adapter library (issue 19): entries, eviction, LoraHub-style composition searched by the
skopt GP, Arrow routing, and the one-line refusals. Tiny model only (a few seconds)."""

import json
import math
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from _cli import in_process

EXE = [sys.executable, "-m", "metapeft.cli"]


def run(*args, home):
    return subprocess.run(EXE + list(args), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200", "METAPEFT_HOME": str(home)})


def _task(seed, family="topic"):
    from metapeft.data.synthetic import generate_task

    return generate_task(seed, family=family, ways=3, shots=4, query=4)


def _adapt(task, out, *, steps=5, method="lora", seed=0, **kw):
    from metapeft import api

    return api.adapt(task, model="tiny", method=method, steps=steps, out=out, seed=seed,
                     target=None, **kw)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("METAPEFT_HOME", str(tmp_path / "reg"))
    return tmp_path / "reg"


def _scores(adapter, params, task):
    from metapeft.train import encode_task

    data = encode_task(task, adapter.base.tokenizer)
    return mx.concatenate([adapter.scores(params, b).reshape(-1)
                           for b in data.prepared(adapter, "query")])


def test_round_trip_add_list_remove(home, tmp_path, tiny):
    from metapeft import library

    task = _task(1)
    _adapt(task, tmp_path / "a")
    res = library.add(tmp_path / "a", task=task, base=tiny)
    assert res.added and res.entry.composable and res.entry.reason is None
    again = library.add(tmp_path / "a", base=tiny)
    assert not again.added and again.entry.id == res.entry.id
    [e] = library.entries()
    assert e.method == "lora" and e.base_model_hash == tiny.fingerprint
    assert e.task == task.name and e.labels == list(task.labels)
    assert len(e.embedding) == tiny.hidden_size and len(e.label_embedding) == tiny.hidden_size
    assert e.features and 0.0 <= e.score <= 1.0
    arrays = e.load()  # the adapter's own tensors, unchanged
    from metapeft.artifacts import load_safetensors

    orig, _ = load_safetensors(tmp_path / "a" / "adapters.safetensors")
    assert set(arrays) == set(orig)
    assert all(np.array_equal(np.asarray(arrays[k]), np.asarray(orig[k])) for k in orig)
    # the CLI sees the same entry, and removes it by an id prefix
    listed = run("library", "list", "--json", home=home)
    assert listed.returncode == 0, listed.stderr
    assert [r["id"] for r in json.loads(listed.stdout)["entries"]] == [e.id]
    gone = run("library", "remove", e.id[:6], home=home)
    assert gone.returncode == 0, gone.stderr
    assert library.entries() == []


def test_keep_and_eviction_of_near_duplicates(home, tmp_path, tiny):
    from metapeft import library

    same = _task(2)
    a = _adapt(same, None, steps=2, keep=True)
    b = _adapt(same, None, steps=8, keep=True)  # same task: the nearest pair
    c = _adapt(_task(3, family="sentiment"), None, steps=2, keep=True, max_size=3)
    ids = [r.extra["library"]["entry"]["id"] for r in (a, b, c)]
    assert len(set(ids)) == 3 and len(library.entries()) == 3
    d = _adapt(_task(4, family="sentiment"), None, steps=2, keep=True, max_size=3)
    evicted = d.extra["library"]["evicted"]
    assert len(evicted) == 1 and "near-duplicate" in evicted[0]["reason"]
    pair = {ids[0]: a.final_accuracy, ids[1]: b.final_accuracy}
    assert evicted[0]["id"] in pair  # the duplicate pair lost a member, not another task
    loser = evicted[0]["id"]
    other = (set(pair) - {loser}).pop()
    assert pair[loser] <= pair[other]
    assert len(library.entries()) == 3


def test_non_lora_is_listed_and_skipped_with_a_reason(home, tmp_path, tiny):
    from metapeft import library

    _adapt(_task(5), tmp_path / "p", method="prompt", steps=1)
    res = library.add(tmp_path / "p", base=tiny)
    assert not res.entry.composable and "no LoRA A/B pair" in res.entry.reason
    bad = run("adapt", str(_task_dir(tmp_path)), "--init", "library:compose", "--steps", "1",
              home=home)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "no library adapter fits" in bad.stderr and "no LoRA A/B pair" in bad.stderr


def _task_dir(tmp_path):
    from metapeft.quickstart import write_task_dir

    d = tmp_path / "taskdir"
    if not d.exists():
        write_task_dir(_task(6), d)
    return d


def test_empty_library_and_bad_route_are_one_line_errors(home, tmp_path):
    t = str(_task_dir(tmp_path))
    for args, needle in [
        (("--init", "library:compose"), "library is empty"),
        (("--route", "arrow"), "library is empty"),
        (("--route", "maze"), "unknown --route"),
        (("--route", "arrow", "--init", "x"), "drop --init"),
        (("--init", "library:mix"), "unknown library init"),
        (("--init", "library:compose:0"), "K >= 1"),
        (("--keep", "--max-size", "0"), "--max-size must be >= 1"),
    ]:
        r = in_process("adapt", t, "--steps", "1", *args, home=home)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, (args, r.stderr)


def test_mismatched_base_model_is_skipped(home, tmp_path, tiny):
    """An entry whose base model fingerprint differs is not composed: one line, exit 2."""
    from metapeft import library
    from metapeft.artifacts import load_safetensors, save_safetensors

    _adapt(_task(7), tmp_path / "a")
    e = library.add(tmp_path / "a", base=tiny).entry
    arrays, meta = load_safetensors(e.path)
    save_safetensors(e.path, arrays, {**meta, "base_model_hash": "0123456789abcdef",
                                      "base_model": "other"})
    r = in_process("adapt", str(_task_dir(tmp_path)), "--route", "arrow", "--steps", "1",
                   home=home)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "base model other" in r.stderr
    # and `library add` refuses a directory trained on another model than --model
    r = in_process("library", "add", str(tmp_path / "a"), "--model", "nosuchmodel", home=home)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_one_member_at_weight_one_is_that_adapter(home, tmp_path, tiny):
    from metapeft.adapter_io import load_adapter
    from metapeft.compose import compose_params

    task = _task(8)
    _adapt(task, tmp_path / "a", steps=5)
    adapter, params = load_adapter(tmp_path / "a")
    composed = compose_params(adapter, [adapter.flat(params)], [1.0])
    np.testing.assert_allclose(np.asarray(_scores(adapter, composed, task)),
                               np.asarray(_scores(adapter, params, task)), rtol=1e-6, atol=1e-6)
    half = compose_params(adapter, [adapter.flat(params)] * 2, [0.5, 0.5])
    np.testing.assert_allclose(np.asarray(_scores(adapter, half, task)),
                               np.asarray(_scores(adapter, params, task)), rtol=1e-5, atol=1e-5)


def test_gp_search_beats_uniform_weights_and_warm_starts(home, tmp_path, tiny):
    """Constructed case: one library LoRA trained on this very task, two on other families'
    tasks. Uniform weights (1/3 each) shrink the good one's update ninefold (A and B are each
    scaled); the GP must find a mixture with a clearly lower support loss. The weights found are
    recorded and warm-start the next search on a similar task."""
    from metapeft import library
    from metapeft.adapters import get_adapter_class
    from metapeft.compose import compose_init
    from metapeft.train import encode_task

    task = _task(9)
    _adapt(task, tmp_path / "good", steps=20, lr=3e-3)
    _adapt(_task(10, family="sentiment"), tmp_path / "o1", steps=20, lr=3e-3)
    _adapt(_task(11, family="sentiment"), tmp_path / "o2", steps=20, lr=3e-3, seed=1)
    for d in ("good", "o1", "o2"):
        library.add(tmp_path / d, base=tiny)
    adapter = get_adapter_class("lora").attach(tiny, {})
    data = encode_task(task, tiny.tokenizer)
    params, rep = compose_init("library:compose:3", adapter, data, task, trials=15)
    assert rep["trials"] == 15 and len(rep["weights"]) == 3
    assert rep["objective"] < rep["objective_uniform"] - 0.05, rep
    assert rep["search_seconds"] > 0 and rep["warm_points"] == 0
    assert len(library.compositions()) == 1
    _, rep2 = compose_init("library:compose:3", adapter, encode_task(_task(12), tiny.tokenizer),
                           _task(12), trials=4)
    assert rep2["warm_points"] == 1


def test_arrow_with_one_library_lora_is_that_lora(home, tmp_path, tiny):
    from metapeft import library
    from metapeft.adapter_io import load_adapter
    from metapeft.route import _accuracy, arrow_init, routed_model
    from metapeft.train import encode_task, evaluate

    task = _task(13)
    _adapt(task, tmp_path / "a", steps=6)
    library.add(tmp_path / "a", base=tiny)
    adapter, params = load_adapter(tmp_path / "a")
    data = encode_task(task, tiny.tokenizer)
    model, layers = routed_model(adapter, [adapter.flat(params)])
    from metapeft.scoring import score_candidates

    q = data.prepared(adapter, "query")
    routed = mx.concatenate([score_candidates(model, b, start=adapter.frozen_blocks).reshape(-1)
                             for b in q])
    np.testing.assert_allclose(np.asarray(routed), np.asarray(_scores(adapter, params, task)),
                               rtol=1e-5, atol=1e-5)
    merged, rep = arrow_init(adapter, data, task)
    assert rep["routed_accuracy"] == pytest.approx(evaluate(adapter, params, q)[0])
    assert rep["experts"][0]["mean_gate"] == pytest.approx(1.0)
    np.testing.assert_allclose(np.asarray(_scores(adapter, merged, task)),
                               np.asarray(_scores(adapter, params, task)), rtol=1e-4, atol=1e-4)
    assert _accuracy(model, adapter, q) == rep["routed_accuracy"]


def test_adapt_json_reports_composition_and_route(home, tmp_path, tiny):
    from metapeft import library

    _adapt(_task(14), tmp_path / "a")
    _adapt(_task(15), tmp_path / "b")
    for d in ("a", "b"):
        library.add(tmp_path / d, base=tiny)
    t = str(_task_dir(tmp_path))
    r = run("adapt", t, "--init", "library:compose:2", "--steps", "2", "--json", home=home)
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)["composition"]
    assert len(c["members"]) == 2 and len(c["weights"]) == 2 and c["search_seconds"] > 0
    r = run("adapt", t, "--route", "arrow", "--steps", "2", "--keep", "--json", home=home)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["route"]["experts"]) == 2 and out["route"]["routed_accuracy"] is not None
    assert out["library"]["added"] and len(library.entries()) == 3


def test_dora_is_listed_not_composable(home, tmp_path, tiny):
    from metapeft import library

    _adapt(_task(16), tmp_path / "d", method="dora", steps=1)
    e = library.add(tmp_path / "d", base=tiny).entry
    assert not e.composable and "DoRA" in e.reason


def test_compose_with_an_init_as_one_more_member(home, tmp_path, tiny):
    from metapeft import library
    from metapeft.adapters import get_adapter_class
    from metapeft.compose import compose_init
    from metapeft.train import encode_task

    _adapt(_task(17), tmp_path / "a")
    _adapt(_task(18), tmp_path / "init")
    library.add(tmp_path / "a", base=tiny)
    adapter = get_adapter_class("lora").attach(tiny, {})
    task = _task(19)
    _, rep = compose_init(f"library:compose+{tmp_path / 'init'}", adapter,
                          encode_task(task, tiny.tokenizer), task, trials=3, record=False)
    assert len(rep["members"]) == 2 and rep["members"][1].get("init") is True
    assert library.compositions() == []  # record=False keeps the store as it was
    # the search's third start is the init alone: its objective is the init's support loss + L1
    from metapeft.adapter_io import load_adapter
    from metapeft.compose import L1, support_loss

    _, init_params = load_adapter(tmp_path / "init")
    alone = support_loss(adapter, init_params,
                         encode_task(task, tiny.tokenizer).prepared(adapter, "support"))
    assert rep["objective_init"] == pytest.approx(alone + L1, rel=1e-5)
    assert rep["objective"] <= rep["objective_init"]


def test_composition_anchored_at_an_init_adapts_at_its_step_size(tmp_path):
    """``library:compose+INIT`` trains at INIT's calibrated lr and schedule; a composition
    without an anchor, or an anchor without a calibration, keeps the method's default."""
    from metapeft.adapter_io import init_adapt_lr, init_adapt_lr_decay
    from metapeft.artifacts import save_safetensors

    cal, plain = tmp_path / "cal.safetensors", tmp_path / "plain.safetensors"
    save_safetensors(cal, {"w": mx.zeros((2,))}, {"adapt_lr": "0.0005", "adapt_lr_decay": "1"})
    save_safetensors(plain, {"w": mx.zeros((2,))}, {})
    assert init_adapt_lr(f"library:compose:3+{cal}") == pytest.approx(5e-4)
    assert init_adapt_lr_decay(f"library:compose+{cal}") == pytest.approx(1.0)
    assert init_adapt_lr(f"library:compose+{plain}") is None
    assert init_adapt_lr_decay(f"library:compose+{plain}") == 0.0
    assert init_adapt_lr("library:compose:3") is None
    assert init_adapt_lr_decay("library:generate") == 0.0
    # a merge trains INIT's own factors: INIT's step size
    assert init_adapt_lr(f"library:merge:3+{cal}") == pytest.approx(5e-4)
    assert init_adapt_lr_decay(f"library:merge+{cal}") == pytest.approx(1.0)
    assert init_adapt_lr("library:merge:2") is None


def test_library_build_cli(home, tmp_path):
    from metapeft.data.synthetic import generate_pool

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": e.text, "label": e.label,
                                        "domain": "a" if i % 2 else "b"}) + "\n"
                            for i, e in enumerate(generate_pool("topic", 0, per_label=12))))
    r = run("library", "build", "--data", str(pool), "--tasks", "2", "--steps", "1", "--ways",
            "3", "--shots", "2", "--query", "2", "--exclude-domains", "b", "--json", home=home)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["added"] == 2 and out["entries"] == 2 and out["disk_bytes"] > 0
    bad = run("library", "build", "--data", str(pool), "--exclude-domains", "nope", home=home)
    assert bad.returncode == 2 and "unknown domain" in bad.stderr


def test_generator_reconstructs_its_library(home, tmp_path, tiny):
    """Trained by reconstruction on two library LoRAs, the generator given one of their tasks
    returns that LoRA's update (in its canonical gauge): the same scores."""
    from metapeft import library
    from metapeft.adapter_io import load_adapter
    from metapeft.adapters import get_adapter_class
    from metapeft.generate import generate_init, train_generator

    t1, t2 = _task(20), _task(21, family="sentiment")
    _adapt(t1, tmp_path / "a", steps=8)
    _adapt(t2, tmp_path / "b", steps=8)
    library.add(tmp_path / "a", task=t1, base=tiny)
    library.add(tmp_path / "b", task=t2, base=tiny)
    adapter = get_adapter_class("lora").attach(tiny, {})
    res = train_generator(adapter, epochs=400)
    assert res["version"] == 1 and len(res["entries"]) == 2
    assert res["final_loss"] < 1e-3 < res["loss_curve"][0]
    gen, rep = generate_init(adapter, t1)
    assert rep["version"] == 1
    a, params = load_adapter(tmp_path / "a")
    np.testing.assert_allclose(np.asarray(_scores(a, gen, t1)),
                               np.asarray(_scores(a, params, t1)), rtol=1e-2, atol=1e-2)
    r = run("library", "train-generator", "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == 2


def test_generate_without_a_generator_is_one_line(home, tmp_path, tiny):
    from metapeft import library

    _adapt(_task(22), tmp_path / "a")
    library.add(tmp_path / "a", base=tiny)
    r = in_process("adapt", str(_task_dir(tmp_path)), "--init", "library:generate", "--steps",
                   "1", home=home)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "train-generator" in r.stderr
    r = in_process("library", "train-generator", home=home)  # the entry has no task embedding
    assert r.returncode == 2 and "at least 2" in r.stderr


def test_library_calibrate_keeps_a_step_size_that_adapt_uses(home, tmp_path, tiny):
    """``library calibrate`` composes each past task as adapt would, tries every candidate
    from there, keeps the best mean over the marks for that spec, and ``adapt`` with the same
    spec trains at it (another spec keeps the method's default); the warm-start store is left
    as it was."""
    from metapeft import library
    from metapeft.data.synthetic import generate_pool

    _adapt(_task(21), tmp_path / "a")
    _adapt(_task(22), tmp_path / "b")
    for d in ("a", "b"):
        library.add(tmp_path / d, base=tiny)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n"
                            for e in generate_pool("topic", 5, per_label=12)))
    r = run("library", "calibrate", "--data", str(pool), "--init", "library:compose:2",
            "--tasks", "2", "--ways", "3", "--shots", "2", "--query", "3", "--lr-factors",
            "3,0.01", "--lr-decays", "0", "--marks", "1,2", "--json", home=home)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["key"] == "compose:2" and rec["num_tasks"] == 2 and rec["marks"] == [1, 2]
    assert set(rec["table"]) == {"3.0", "0.01"}
    best = max(rec["table"], key=lambda k: (rec["table"][k]["mean"], -abs(np.log(float(k)))))
    assert rec["adapt_lr"] == pytest.approx(1e-3 * float(best))  # LoRA's default lr × factor
    assert library.compositions() == []  # calibration searches are not recorded
    assert [s["key"] for s in library.step_sizes()] == ["compose:2"]
    # split over 2 processes (ring backend): the same curves, the same choice, one record
    two = run("library", "calibrate", "--data", str(pool), "--init", "library:compose:2",
              "--tasks", "2", "--ways", "3", "--shots", "2", "--query", "3", "--lr-factors",
              "3,0.01", "--lr-decays", "0", "--marks", "1,2", "--json", "--processes", "2",
              home=home)
    assert two.returncode == 0, two.stderr
    rec2 = json.loads(two.stdout)
    assert rec2["table"] == rec["table"] and rec2["adapt_lr"] == rec["adapt_lr"]
    assert len(library.step_sizes()) == 1  # the same spec's record replaced, not added
    quiet = _adapt(_task(23), tmp_path / "q", steps=1, init="library:compose:2",
                   record_composition=False)
    assert quiet.extra["composition"]["step_size"]["lr"] == pytest.approx(rec["adapt_lr"])
    assert library.compositions() == []  # an evaluation's search leaves the store as it was
    t = str(_task_dir(tmp_path))
    out = json.loads(run("adapt", t, "--init", "library:compose:2", "--steps", "1", "--json",
                         home=home).stdout)
    size = out["composition"]["step_size"]
    assert size["source"] == "library calibration" and size["tasks"] == 2
    assert size["lr"] == pytest.approx(rec["adapt_lr"]) and size["lr_decay"] == 0
    other = json.loads(run("adapt", t, "--init", "library:compose:1", "--steps", "1", "--json",
                           home=home).stdout)
    assert "step_size" not in other["composition"]
    bad = run("library", "calibrate", "--data", str(pool), "--init", "library:generate",
              home=home)
    assert bad.returncode == 2 and "library:compose" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_calibration_with_one_start_per_task_is_the_shared_start_repeated(tiny):
    from metapeft.adapters import get_adapter_class
    from metapeft.meta.stepsize import calibrate_adapt_lr

    adapter = get_adapter_class("lora").attach(tiny, {})
    params = adapter.init_params(0)
    tasks = [_task(30), _task(31)]
    shared = calibrate_adapt_lr(adapter, params, tasks, 1e-3, factors=(1.0, 0.1), marks=(1,))
    listed = calibrate_adapt_lr(adapter, [params, params], tasks, 1e-3, factors=(1.0, 0.1),
                                marks=(1,))
    assert shared["table"] == listed["table"]
    with pytest.raises(ValueError, match="starts for 2 tasks"):
        calibrate_adapt_lr(adapter, [params], tasks, 1e-3)


def test_side_by_side_computes_the_exact_sum_of_updates(home, tmp_path, tiny):
    """``LoRA.widened(n)`` over ``side_by_side`` scores as the base model with Σ wᵢ·ΔWᵢ added:
    one member at weight 1 scores as that LoRA, and two members as the model with both fused in
    (no cross terms, unlike LoraHub's separately summed A and B)."""
    from metapeft.adapter_io import load_adapter
    from metapeft.adapters.stacked import _fused_model

    _adapt(_task(30), tmp_path / "a", steps=4, lr=3e-3)
    _adapt(_task(31), tmp_path / "b", steps=4, lr=3e-3, seed=1)
    adapter, pa = load_adapter(tmp_path / "a")
    _, pb = load_adapter(tmp_path / "b")
    fa, fb = adapter.flat(pa), adapter.flat(pb)
    task = _task(32)
    one = adapter.widened(1)
    np.testing.assert_allclose(np.asarray(_scores(one, one.unflat(type(adapter).side_by_side(
        [fa], [1.0])), task)), np.asarray(_scores(adapter, pa, task)), rtol=1e-5, atol=1e-5)
    two = adapter.widened(2)
    w = [0.7, -1.3]
    wide = _scores(two, two.unflat(type(adapter).side_by_side([fa, fb], w)), task)
    # the same sum fused into plain linear layers, one member at a time
    import copy

    from metapeft.train import encode_task

    base = _fused_model(one, one.unflat(type(adapter).side_by_side([fa], [w[0]])))
    q = encode_task(task, tiny.tokenizer).prepared(adapter, "query")
    under = copy.copy(tiny)
    under.model = base
    second = type(adapter).attach(under, adapter.config)
    fused = mx.concatenate([second.scores(second.unflat(type(adapter).side_by_side(
        [fb], [w[1]])), b).reshape(-1) for b in q])
    np.testing.assert_allclose(np.asarray(wide), np.asarray(fused), rtol=1e-4, atol=1e-4)
    # LoraHub's separate sums are a different point whenever both weights are nonzero
    from metapeft.compose import compose_params

    lorahub = _scores(adapter, compose_params(adapter, [fa, fb], w), task)
    assert float(mx.abs(lorahub - wide).max()) > 1e-3


def test_merge_keeps_init_trainable_under_the_merged_members(home, tmp_path, tiny):
    """``library:merge+INIT``: the search starts from INIT alone (w = 0, its objective INIT's
    support loss), the result is a stack whose trained stage starts at INIT's own factors, and
    it scores at step 0 as the widened LoRA did at the weights found. On the top block only:
    the stack then reads the base model's frozen-trunk cache (its merged blocks are above it)."""
    from metapeft import library
    from metapeft.adapter_io import load_adapter
    from metapeft.adapters import get_adapter_class
    from metapeft.compose import L1, library_init, support_loss
    from metapeft.train import encode_task

    top1 = {"num_layers": 1}
    _adapt(_task(33), tmp_path / "a", steps=6, lr=3e-3, config=top1)
    _adapt(_task(34), tmp_path / "b", steps=6, lr=3e-3, seed=1, config=top1)
    _adapt(_task(35), tmp_path / "init", steps=3, config=top1)
    for d in ("a", "b"):
        library.add(tmp_path / d, base=tiny)
    adapter = get_adapter_class("lora").attach(tiny, top1)
    assert adapter.frozen_blocks > 0
    task = _task(36)
    data = encode_task(task, tiny.tokenizer)
    stack, params, (key, rep) = library_init(f"library:merge:2+{tmp_path / 'init'}", None,
                                             adapter, data, task)
    assert key == "composition" and rep["kind"] == "merge" and len(rep["weights"]) == 2
    assert stack.method == "stack" and stack.stage_methods == ["lora", "lora"]
    assert stack.frozen_blocks == adapter.frozen_blocks
    assert data.prepared(stack, "support") is data.prepared(adapter, "support")
    _, init_params = load_adapter(tmp_path / "init")
    for k, v in adapter.flat(init_params).items():  # INIT's factors, untouched
        np.testing.assert_array_equal(np.asarray(stack.new.flat(params)[k]), np.asarray(v))
    alone = support_loss(adapter, init_params, data.prepared(adapter, "support"))
    assert rep["objective_init"] == pytest.approx(alone, rel=1e-5)
    assert rep["objective"] <= rep["objective_init"] + 1e-9
    assert rep["support_loss"] == pytest.approx(
        support_loss(stack, params, data.prepared(stack, "support")), rel=1e-4, abs=1e-4)
    assert rep["objective"] == pytest.approx(
        rep["support_loss"] + L1 * sum(abs(w) for w in rep["weights"]), rel=1e-4, abs=1e-4)
    [rec] = library.compositions()
    assert rec["kind"] == "merge"


def test_adapt_merge_saves_a_stack_and_trains_at_init_step_size(home, tmp_path, tiny):
    from metapeft import library
    from metapeft.adapter_io import load_adapter
    from metapeft.artifacts import load_safetensors, save_safetensors

    _adapt(_task(37), tmp_path / "a", steps=6, lr=3e-3)
    library.add(tmp_path / "a", base=tiny)
    _adapt(_task(38), tmp_path / "i", steps=3)
    arrays, meta = load_safetensors(tmp_path / "i" / "adapters.safetensors")
    init = tmp_path / "init.safetensors"
    save_safetensors(init, arrays, {**meta, "adapt_lr": "0.0042", "adapt_lr_decay": "0.5"})
    rep = _adapt(_task(39), tmp_path / "m", steps=2, init=f"library:merge:1+{init}",
                 record_composition=False)
    j = rep.to_json()
    assert rep.extra["lr"] == pytest.approx(0.0042) and j["composition"]["kind"] == "merge"
    assert library.compositions() == []
    stack, params = load_adapter(tmp_path / "m")
    assert stack.method == "stack"
    kept = library.add(tmp_path / "m", base=tiny).entry  # listed, skipped with its reason
    assert not kept.composable and kept.reason == "stack has no LoRA A/B pair to mix"
    r = run("adapt", str(_task_dir(tmp_path)), "--init", "library:merge:x", "--steps", "1",
            home=home)
    assert r.returncode == 2 and "library:merge:K needs an integer K" in r.stderr, r.stderr
    r = run("library", "calibrate", "--data", str(tmp_path / "none.jsonl"), "--init",
            "library:merge", home=home)
    assert r.returncode == 2


def test_merge_bound_is_calibrated_kept_and_used(home, tmp_path, tiny):
    """``library calibrate --init library:merge...`` merges each past task at every candidate
    bound, trains INIT from there, keeps the best mean over the marks, and ``adapt`` with the
    spec searches within it; at bound 0 the merge is INIT alone, curve for curve; the search
    never leaves the box; and the options that do not apply are one-line refusals."""
    from metapeft import library

    _adapt(_task(41), tmp_path / "a", steps=6, lr=3e-3)
    _adapt(_task(42), tmp_path / "b", steps=6, lr=3e-3, seed=1)
    _adapt(_task(43), tmp_path / "init", steps=3)
    for d in ("a", "b"):
        library.add(tmp_path / d, base=tiny)
    spec = f"library:merge:2+{tmp_path / 'init'}"
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n"
                            for e in generate_pool_rows()))
    r = run("library", "calibrate", "--data", str(pool), "--init", spec, "--tasks", "2",
            "--ways", "3", "--shots", "2", "--query", "3", "--bounds", "1.5,0", "--lr-factors",
            "1,0.5", "--marks", "0,1", "--json", home=home)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["key"].startswith("merge:2+") and rec["num_tasks"] == 2 and rec["marks"] == [0, 1]
    assert set(rec["table"]) == {"1.5", "1.5 x0.5", "0"}  # INIT alone at its own lr only
    # the rule: best mean, then the smaller bound, then the factor nearer 1
    best = max(rec["table"].values(), key=lambda row: (row["mean"], -row["bound"],
                                                       -abs(math.log(row["lr_factor"]))))
    assert (rec["merge_bound"], rec["merge_lr_factor"]) == (best["bound"], best["lr_factor"])
    assert [b["key"] for b in library.merge_bounds()] == [rec["key"]]
    assert library.compositions() == [] and library.step_sizes() == []
    task = _task(44)
    used = _adapt(task, tmp_path / "u", steps=1, init=spec, record_composition=False)
    c = used.extra["composition"]
    assert c["bound"] == rec["merge_bound"] and c["bound_source"] == "calibrated on 2 tasks"
    # a kept factor on INIT's lr trains the merged start at that fraction of INIT's lr
    kept = library.merge_bounds()[0]
    library.record_merge_bound({**kept, "merge_bound": 1.5, "merge_lr_factor": 0.5})
    halved = _adapt(task, tmp_path / "h", steps=1, init=spec, record_composition=False)
    at_init = _adapt(task, tmp_path / "f", steps=1, init=spec, record_composition=False,
                     merge_bound=1.5)
    assert halved.extra["composition"]["step_size"]["lr_factor"] == 0.5
    assert "step_size" not in at_init.extra["composition"]  # a given bound: INIT's lr
    assert halved.extra["lr"] == pytest.approx(0.5 * at_init.extra["lr"])
    given = _adapt(task, tmp_path / "g", steps=1, init=spec, record_composition=False,
                   merge_bound=1.5, merge_lr_factor=0.25)
    assert given.extra["lr"] == pytest.approx(0.25 * at_init.extra["lr"])
    boxed = _adapt(task, tmp_path / "x", steps=1, init=spec, record_composition=False,
                   merge_bound=0.3)
    c = boxed.extra["composition"]
    assert c["bound_source"] == "given" and max(abs(w) for w in c["weights"]) <= 0.3 + 1e-9
    zero = _adapt(task, tmp_path / "z", steps=2, init=spec, record_composition=False,
                  merge_bound=0)
    alone = _adapt(task, tmp_path / "i", steps=2, init=str(tmp_path / "init"))
    assert zero.extra["composition"]["weights"] == [0.0, 0.0]
    assert zero.accuracies == alone.accuracies and zero.losses == pytest.approx(alone.losses)
    t = str(_task_dir(tmp_path))
    bad = run("adapt", t, "--init", "library:compose:2", "--merge-bound", "0.5", home=home)
    assert bad.returncode == 2 and "--merge-bound applies to --init library:merge" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    for extra in (["--init", "library:compose:2", "--merge-lr-factor", "0.5"],
                  ["--init", spec, "--merge-bound", "0", "--merge-lr-factor", "0.5"]):
        bad = run("adapt", t, *extra, home=home)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert "--merge-lr-factor" in bad.stderr
    for extra in (["--init", spec, "--lr-decays", "1"],
                  ["--init", spec, "--lr-factors", "0"],
                  ["--init", "library:compose:2", "--bounds", "0.5"],
                  ["--init", spec, "--bounds", "-1"]):
        bad = run("library", "calibrate", "--data", str(pool), *extra, home=home)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def generate_pool_rows():
    from metapeft.data.synthetic import generate_pool

    return generate_pool("topic", 5, per_label=12)
