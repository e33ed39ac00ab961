"""The embedded tiny model: deterministic, loadable, atomic build (with a shortened pretraining)."""

from __future__ import annotations

import hashlib

import pytest

import metapeft  # noqa: F401  (preloads OpenBLAS before mlx)
from metapeft import tiny_model


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def short_pretrain(monkeypatch):
    monkeypatch.setattr(tiny_model, "PRETRAIN_STEPS", 8)


def test_build_is_deterministic_and_loads(tmp_path, short_pretrain):
    a = tiny_model.ensure_tiny_model(tmp_path / "a")
    b = tiny_model.ensure_tiny_model(tmp_path / "b")
    assert a.name == tiny_model.NAME and tiny_model.NAME.startswith("tiny-llama-v2-")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert _sha(a / name) == _sha(b / name), name
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp left

    from mlx_lm import load

    from metapeft.data.synthetic import generate_pool

    model, tok = load(str(a))
    text = generate_pool("topic", 0, 1)[0].text
    ids = tok.encode(text)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    import mlx.core as mx

    logits = model(mx.array([ids]))
    assert logits.shape[-1] == len(tiny_model._vocab())
    assert bool(mx.all(mx.isfinite(logits)).item())


def test_pretraining_changes_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_model, "PRETRAIN_STEPS", 0)
    raw = tiny_model.ensure_tiny_model(tmp_path / "raw")
    monkeypatch.setattr(tiny_model, "PRETRAIN_STEPS", 4)
    trained = tiny_model.ensure_tiny_model(tmp_path / "trained")
    assert _sha(raw / "model.safetensors") != _sha(trained / "model.safetensors")


def test_existing_model_is_a_noop(tmp_path, monkeypatch):
    dest = tmp_path / tiny_model.NAME
    dest.mkdir()
    (dest / "model.safetensors").write_bytes(b"sentinel")
    (dest / "tokenizer.json").write_text("{}")

    def boom(_dest):
        raise AssertionError("rebuilt an existing model")

    monkeypatch.setattr(tiny_model, "_write", boom)
    assert tiny_model.ensure_tiny_model(tmp_path) == dest
    assert (dest / "model.safetensors").read_bytes() == b"sentinel"
    assert sorted(p.name for p in tmp_path.iterdir()) == [tiny_model.NAME]


def test_module_does_not_import_mlx_lm_at_top_level():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(tiny_model))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [getattr(n, "module", "") or "" for n in top]
    assert not any(n.startswith(("mlx", "tokenizers", "safetensors")) for n in names)
