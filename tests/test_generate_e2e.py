"""The LoRA generator's end-to-end stage (issue 19 item 3): fine-tuned through the query loss of
the LoRAs it generates on meta-train episodes, it starts unseen episodes of those classes at a
lower query loss than the same generator trained by reconstruction only; the artifact records
how it was trained; bad input is one line, exit 2. Tiny model only (about 20 s)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _cli import in_process

EXE = [sys.executable, "-m", "metapeft.cli"]
EPISODE = {"ways": 3, "shots": 4, "query": 4}


def run(*args, home):
    return subprocess.run(EXE + list(args), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200", "METAPEFT_HOME": str(home)})


def _one_line(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


@pytest.fixture(scope="module")
def lib(tmp_path_factory, tiny):
    """A library of 3 LoRAs built from episodes of a synthetic pool (the meta-train data)."""
    from metapeft import api
    from metapeft.data.synthetic import generate_pool

    root = tmp_path_factory.mktemp("e2e")
    pool = root / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": e.text, "label": e.label, "domain": "a"}) + "\n"
                            for e in generate_pool("topic", 0, per_label=30)))
    reg = root / "reg"
    api.library_build(pool, model="tiny", tasks=3, steps=10, registry=reg, **EPISODE)
    return reg, pool


def _query_losses(adapter, version, reg, pool, seeds):
    """The query loss of the generated init (no step taken) on episodes ``seeds``."""
    from metapeft.data.episodes import EpisodeSource
    from metapeft.data.tasks import read_rows
    from metapeft.generate import generate_init
    from metapeft.train import batch_loss, encode_task

    source = EpisodeSource(read_rows(pool), **EPISODE)
    out = []
    for s in seeds:
        task = source.sample(s)
        params, rep = generate_init(adapter, task, reg, version=version)
        assert rep["version"] == version
        data = encode_task(task, adapter.base.tokenizer)
        out.append(batch_loss(adapter, params, data.prepared(adapter, "query")).item())
    return np.asarray(out)


def test_e2e_lowers_the_query_loss_of_generated_inits(lib, tiny):
    from metapeft.adapters import get_adapter_class
    from metapeft.artifacts import json_field, read_metadata
    from metapeft.generate import E2E, train_generator

    reg, pool = lib
    adapter = get_adapter_class("lora").attach(tiny, {})
    recon = train_generator(adapter, registry=reg, epochs=200)
    e2e = train_generator(adapter, registry=reg, epochs=200, e2e=E2E(
        steps=30, data=str(pool), **EPISODE))
    assert (recon["version"], e2e["version"]) == (1, 2)
    assert recon["final_loss"] == e2e["final_loss"]  # the same reconstruction stage, then e2e
    # held-out episodes of the meta-train pool (seeds the e2e stage never drew)
    seeds = range(90_000, 90_016)
    before = _query_losses(adapter, 1, reg, pool, seeds)
    after = _query_losses(adapter, 2, reg, pool, seeds)
    diff = after - before
    assert diff.mean() < -0.1, (before.mean(), after.mean())
    assert (diff < 0).mean() >= 0.75
    # the artifact says how it was trained
    t = json_field(read_metadata(e2e["path"]), "training")
    assert t["reconstruction_steps"] == 200 and t["e2e_steps"] == 30 and t["inner_steps"] == 0
    s = t["e2e"]
    assert s["tasks"] == 30 * 4 and s["order"] == "exact (k = 0)" and s["data"] == str(pool)
    assert (s["ways"], s["shots"], s["query"]) == (3, 4, 4) and s["inner_lr"] == 1e-3
    assert s["query_loss_last"] < s["query_loss_first"]
    v = s["validation"]
    assert v["episodes"] == 8 and v["query_loss_after"] < v["query_loss_before"] - 0.1
    assert json_field(read_metadata(recon["path"]), "training")["e2e"] is None


def test_cli_e2e_with_inner_steps_round_trips(lib, tiny, monkeypatch):
    from metapeft.artifacts import json_field, read_metadata

    reg, pool = lib
    r = run("library", "train-generator", "--epochs", "20", "--e2e-steps", "3", "--inner-steps",
            "1", "--meta-batch", "2", "--data", str(pool), "--ways", "3", "--shots", "4",
            "--query", "4", "--val-episodes", "2", "--json", home=reg)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    s = out["training"]["e2e"]
    assert s["order"] == "first" and s["steps"] == 3 and s["inner_steps"] == 1
    assert s["tasks"] == 6 and len(s["query_loss_curve"]) == 3
    assert s["validation"]["episodes"] == 2
    header = read_metadata(out["path"])
    assert json_field(header, "training") == out["training"]
    assert json_field(header, "version") == out["version"]
    # adapt starts from that version by name, and its report says how it was trained
    from metapeft import api
    from metapeft.data.synthetic import generate_task

    monkeypatch.setenv("METAPEFT_HOME", str(reg))
    rep = api.adapt(generate_task(5, family="topic", **EPISODE), model="tiny", steps=1,
                    target=None, init=f"library:generate@{out['version']}")
    g = rep.extra["generation"]
    assert g["version"] == out["version"] and g["e2e_steps"] == 3 and g["inner_steps"] == 1


def test_bad_input_is_one_line(lib, tmp_path):
    reg, pool = lib
    gen = ("library", "train-generator")
    _one_line(in_process(*gen, "--e2e-steps", "2", home=reg), "--data")
    _one_line(in_process(*gen, "--data", str(pool), home=reg), "--e2e-steps")
    _one_line(in_process(*gen, "--e2e-steps", "2", "--inner-steps", "-1", "--data", str(pool),
                         home=reg), "--inner-steps")
    _one_line(in_process(*gen, "--e2e-steps", "2", "--data", str(pool), "--exclude-domains",
                         "nope", home=reg), "unknown domain")
    from metapeft.quickstart import write_task_dir
    from metapeft.data.synthetic import generate_task

    write_task_dir(generate_task(6, family="topic", **EPISODE), tmp_path / "t")
    for init, needle in (("library:generate@x", "version number"),
                         ("library:generate@99", "version 99")):
        _one_line(in_process("adapt", tmp_path / "t", "--init", init, "--steps", "1", home=reg),
                  needle)


def test_e2e_gradient_is_the_query_loss_gradient_through_the_generator(lib, tiny):
    """The vector-Jacobian product (stop-gradient surrogate) equals mx's gradient of the mean
    query loss taken through the generator directly: at k = 0, and through one inner step
    with second order."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from metapeft.adapters import get_adapter_class
    from metapeft.data.episodes import EpisodeSource
    from metapeft.data.tasks import read_rows
    from metapeft.generate import (Generator, _keymap, _modules, _split, e2e_gradients,
                                   generated)
    from metapeft.library import task_embedding
    from metapeft.meta.batch import encode_episode
    from metapeft.meta.learner import MetaConfig, inner_adapt
    from metapeft.train import batch_loss

    _, pool = lib
    adapter = get_adapter_class("lora").attach(tiny, {})
    flat = adapter.flat(adapter.init_params(0))
    mods = _modules(flat)
    layers = sorted({_split(m)[0] for m in mods})
    types = {_split(m)[1]: (flat[f"{m}.lora_a"].shape[0], flat[f"{m}.lora_b"].shape[1])
             for m in mods}
    mx.random.seed(0)
    net = Generator(tiny.hidden_size, layers, types, adapter.config.rank)
    scales = [0.05] * len(types)
    keymap = _keymap(adapter, layers, sorted(types))
    source = EpisodeSource(read_rows(pool), **EPISODE)
    tasks = [source.sample(s) for s in (7, 8)]
    eps = [encode_episode(t, tiny.tokenizer, prepare=adapter.prepare) for t in tasks]
    emb = mx.array(np.asarray([task_embedding(tiny, t) for t in tasks], np.float32))
    for algorithm, k in (("fomaml", 0), ("maml", 1)):
        inner = MetaConfig(algorithm=algorithm, inner_steps=k, inner_lr=0.05,
                           inner_optimizer="sgd")
        losses, _, grads = e2e_gradients(net, adapter, scales, keymap, inner, emb,
                                         [(e.support, e.query) for e in eps])

        def direct(model):
            out = generated(model, emb, scales, keymap)
            total = 0.0
            for j, e in enumerate(eps):
                theta = adapter.unflat({key: v[j] for key, v in out.items()})
                total = total + batch_loss(adapter, inner_adapt(adapter, theta, e.support, inner),
                                           e.query)
            return total / len(eps)

        loss, want = nn.value_and_grad(net, direct)(net)
        assert abs(float(np.mean(losses)) - loss.item()) < 1e-4
        got, want = dict(tree_flatten(grads)), dict(tree_flatten(want))
        assert set(got) == set(want)
        norm = max(float(mx.abs(v).max()) for v in want.values())
        assert norm > 0
        for key in want:
            np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]),
                                       atol=1e-4 * norm, rtol=1e-3, err_msg=key)


def _calibrated_init(reg, tmp_path, tiny):
    """A LoRA trained on one synthetic task, saved as a meta-weights-like file whose header
    carries a calibrated step size (as `meta-train` publishes it)."""
    from metapeft import api
    from metapeft.artifacts import load_safetensors, save_safetensors
    from metapeft.data.synthetic import generate_task

    api.adapt(generate_task(41, family="topic", **EPISODE), model="tiny", steps=5, target=None,
              out=tmp_path / "init")
    arrays, meta = load_safetensors(tmp_path / "init" / "adapters.safetensors")
    path = tmp_path / "init.safetensors"
    save_safetensors(path, arrays, {**meta, "adapt_lr": "0.002", "adapt_lr_decay": "3"})
    return path


def test_anchored_generator_starts_at_its_init_and_moves_toward_the_adapted_lora(
        lib, tiny, tmp_path, monkeypatch):
    """A residual generator on a meta-init (issue 19): with its heads at zero it is that init
    for every task; a few Reptile e2e steps move the generated LoRAs toward where the support
    steps take the init on unseen episodes (a sign error would move them away); `adapt` uses
    the init's calibrated step size."""
    import mlx.core as mx

    from metapeft import api
    from metapeft.adapters import get_adapter_class
    from metapeft.artifacts import json_field, read_metadata
    from metapeft.data.episodes import EpisodeSource
    from metapeft.data.synthetic import generate_task
    from metapeft.data.tasks import read_rows
    from metapeft.generate import (E2E, _keymap, generate_init, generated, latest_generator,
                                   load_anchor, load_generator, train_generator, zero_heads)
    from metapeft.meta.learner import MetaConfig, inner_adapt
    from metapeft.train import encode_task

    reg, pool = lib
    init = _calibrated_init(reg, tmp_path, tiny)
    adapter = get_adapter_class("lora").attach(tiny, {})
    res = train_generator(adapter, registry=reg, anchor=str(init), e2e=E2E(
        steps=6, inner_steps=3, algorithm="reptile", lr=3e-3, data=str(pool), val_episodes=0,
        **EPISODE))
    assert res["anchor"] == str(init)
    path, meta = latest_generator(adapter, reg, res["version"])
    header = read_metadata(path)
    t = json_field(header, "training")
    assert t["reconstruction_steps"] == 0 and t["e2e"]["order"] == "reptile"
    assert t["e2e"]["inner_lr"] == pytest.approx(2e-3)  # the anchor's first step
    assert float(header["adapt_lr"]) == pytest.approx(2e-3) and header["adapt_lr_decay"] == "3"
    anchor = load_anchor(path)
    # zero heads: every task's LoRA is the anchor exactly
    net = load_generator(path, meta)
    zero_heads(net)
    emb = mx.random.normal((3, net.inp.weight.shape[1]))
    out = generated(net, emb, list(meta["scales"]),
                    _keymap(adapter, net.layers, net.type_names), anchor)
    for k, v in out.items():
        assert mx.array_equal(v, mx.broadcast_to(anchor[k], v.shape)).item(), k
    # trained: on unseen episodes the residual points where Reptile's support steps go
    source = EpisodeSource(read_rows(pool), **EPISODE)
    inner = MetaConfig(algorithm="reptile", inner_steps=3, inner_lr=2e-3, inner_optimizer="adam")
    cosines = []
    for s in range(90_000, 90_006):
        task = source.sample(s)
        theta, _ = generate_init(adapter, task, reg, version=res["version"])
        data = encode_task(task, tiny.tokenizer)
        theta0 = adapter.unflat(anchor)
        phi = inner_adapt(adapter, theta0, data.prepared(adapter, "support"), inner)
        d_gen = adapter.flat(theta)
        d_phi = adapter.flat(phi)
        dot = sum(((d_gen[k] - anchor[k]) * (d_phi[k] - anchor[k])).sum().item() for k in anchor)
        n1 = sum(((d_gen[k] - anchor[k]) ** 2).sum().item() for k in anchor) ** 0.5
        n2 = sum(((d_phi[k] - anchor[k]) ** 2).sum().item() for k in anchor) ** 0.5
        cosines.append(dot / (n1 * n2))
    assert np.mean(cosines) > 0.05 and min(cosines) > 0, cosines  # a sign error: < 0
    # adapt from it: the anchor's calibrated lr and decay, and the report names the anchor
    monkeypatch.setenv("METAPEFT_HOME", str(reg))
    rep = api.adapt(generate_task(5, family="topic", **EPISODE), model="tiny", steps=1,
                    target=None, init=f"library:generate@{res['version']}")
    assert rep.extra["generation"]["anchor"] == str(init)
    assert rep.extra["lr"] == pytest.approx(2e-3) and rep.extra["lr_decay"] == pytest.approx(3)


def test_anchored_generator_bad_input_is_one_line(lib, tiny, tmp_path):
    reg, pool = lib
    init = _calibrated_init(reg, tmp_path, tiny)
    gen = ("library", "train-generator", "--data", str(pool))
    _one_line(in_process(*gen, "--anchor", str(init), "--epochs", "5", "--e2e-steps", "1",
                         home=reg), "--epochs")
    _one_line(in_process("library", "train-generator", "--anchor", str(init), home=reg),
              "--e2e-steps")
    _one_line(in_process(*gen, "--e2e-steps", "1", "--e2e-algorithm", "reptile", home=reg),
              "--inner-steps")
    _one_line(in_process(*gen, "--e2e-steps", "1", "--e2e-algorithm", "sgd", home=reg),
              "--e2e-algorithm")
    _one_line(in_process(*gen, "--e2e-steps", "1", "--inner-steps", "1", "--e2e-algorithm",
                         "reptile", "--second-order", home=reg), "--second-order")
    _one_line(in_process(*gen, "--e2e-steps", "1", "--inner-steps", "1", "--anchor",
                         "library:generate", home=reg), "--anchor")


def test_generator_input_is_centred_so_tasks_differ(lib, tiny):
    """Task embeddings are mean-pooled LM states that share one large direction; G centres them
    on its library's mean and scales them to unit RMS, so its first layer sees tasks that
    differ by O(1) rather than by a few percent; the statistics travel in the file, and a file
    without them (written before) loads as the identity."""
    import mlx.core as mx

    from metapeft import library
    from metapeft.adapters import get_adapter_class
    from metapeft.artifacts import load_safetensors, save_safetensors
    from metapeft.generate import Generator, latest_generator, load_generator, train_generator

    reg, _ = lib
    adapter = get_adapter_class("lora").attach(tiny, {})
    res = train_generator(adapter, registry=reg, epochs=2)
    path, meta = latest_generator(adapter, reg, res["version"])
    net = load_generator(path, meta)
    emb = np.stack([e.embedding for e in library.entries(reg)]).astype(np.float32)
    assert np.allclose(np.asarray(net.inp_center), emb.mean(axis=0), atol=1e-6)
    x = (mx.array(emb) - net.inp_center) / net.inp_scale
    assert float(mx.sqrt((x ** 2).mean()).item()) == pytest.approx(1.0, rel=1e-4)
    # the raw embeddings are nearly parallel; what G's first layer sees is not
    cos = lambda a: (a @ a.T / np.outer(*[np.linalg.norm(a, axis=1)] * 2))[0, 1:]
    assert cos(emb).min() > 0.8, cos(emb)
    assert cos(np.asarray(x)).max() < 0.5, cos(np.asarray(x))
    # not trained: the statistics are frozen (no gradient, so no optimiser moves them)
    from mlx.utils import tree_flatten
    assert not {k for k, _ in tree_flatten(net.trainable_parameters())} & {"inp_center",
                                                                          "inp_scale"}
    # a file from before the statistics existed loads as the identity
    arrays, header = load_safetensors(path)
    old = path.with_name("old.safetensors")
    save_safetensors(old, {k: v for k, v in arrays.items() if not k.startswith("inp_")},
                     header)
    legacy = load_generator(old, meta)
    assert mx.array_equal(legacy.inp_center, mx.zeros_like(net.inp_center)).item()
    assert legacy.inp_scale.item() == 1.0
    assert isinstance(legacy, Generator)
