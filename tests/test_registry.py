"""The local meta-weights registry: versions, latest/rollback, delete, compare, concurrency."""

from __future__ import annotations

import math
import multiprocessing as mp

import metapeft  # noqa: F401  (preloads OpenBLAS before mlx; spawned workers import this module)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from metapeft import registry as reg
from metapeft.artifacts import load_safetensors, read_metadata
from metapeft.errors import UserError


def _arrays(scale: float = 1.0) -> dict:
    return {"layer.a": mx.full((2, 3), scale, dtype=mx.float32),
            "layer.b": mx.arange(4, dtype=mx.float32) * scale}


def _save3(root):
    out = []
    for i in (1, 2, 3):
        out.append(reg.save_version("maml-lora", _arrays(i), {
            "method": "lora", "algorithm": "fomaml", "base_model": "tiny", "num_tasks": 8 * i,
            "meta_loss": [2.0, 1.0 / i], "val_accuracy": [0.3, 0.5 + i / 10]}, registry=root))
    return out


def test_save_list_resolve(tmp_path):
    saved = _save3(tmp_path)
    assert [v for v, _ in saved] == [1, 2, 3]
    d = tmp_path / "weights" / "maml-lora"
    assert saved[0][1] == d / "v0001.safetensors"
    assert (d / "LATEST").read_text().strip() == "3"
    meta = read_metadata(saved[1][1])
    assert meta["name"] == "maml-lora" and meta["version"] == "2" and meta["created"].endswith("+00:00")

    rows = reg.list_weights(tmp_path)
    assert [(r["name"], r["version"], r["latest"]) for r in rows] == [
        ("maml-lora", 1, False), ("maml-lora", 2, False), ("maml-lora", 3, True)]
    r = rows[1]
    assert (r["method"], r["algorithm"], r["base_model"], r["num_tasks"]) == ("lora", "fomaml", "tiny", 16)
    assert r["meta_loss"] == pytest.approx(0.5) and r["val_accuracy"] == pytest.approx(0.7)
    assert r["size_bytes"] > 0

    assert reg.resolve("maml-lora", tmp_path) == saved[2][1]
    assert reg.resolve("maml-lora@latest", tmp_path) == saved[2][1]
    assert reg.resolve("maml-lora@2", tmp_path) == saved[1][1]
    assert reg.resolve("maml-lora@v1", tmp_path) == saved[0][1]
    arrays, _ = load_safetensors(reg.resolve("maml-lora@v2", tmp_path))
    assert np.allclose(np.array(arrays["layer.b"]), [0, 2, 4, 6])
    assert reg.checkpoint_path("maml-lora", tmp_path) == d / "checkpoint.safetensors"

    with pytest.raises(UserError, match="available versions of maml-lora: 1, 2, 3"):
        reg.resolve("maml-lora@7", tmp_path)
    with pytest.raises(UserError, match="no meta-weights named 'nope'.*maml-lora"):
        reg.resolve("nope", tmp_path)


def test_show(tmp_path):
    _save3(tmp_path)
    info = reg.show("maml-lora@2", tmp_path)
    assert info["version"] == 2 and not info["latest"]
    assert info["metadata"]["meta_loss"] == [2.0, 0.5] and info["metadata"]["num_tasks"] == 16
    assert info["tensors"]["layer.a"] == {"shape": [2, 3], "dtype": "F32"}
    assert info["num_tensors"] == 2 and info["num_parameters"] == 10


def test_rollback_then_delete(tmp_path):
    saved = _save3(tmp_path)
    assert reg.rollback("maml-lora", 1, tmp_path) == saved[0][1]
    assert all(p.exists() for _, p in saved)
    assert reg.resolve("maml-lora", tmp_path) == saved[0][1]
    assert [r["latest"] for r in reg.list_weights(tmp_path)] == [True, False, False]
    with pytest.raises(UserError, match="available versions"):
        reg.rollback("maml-lora", 9, tmp_path)

    # deleting a non-latest version leaves latest alone
    out = reg.delete("maml-lora@3", tmp_path)
    assert out["deleted"] == [3] and out["latest"] == 1
    assert reg.list_versions("maml-lora", tmp_path) == [1, 2]
    # deleting the latest moves LATEST to the highest remaining
    out = reg.delete("maml-lora@v1", tmp_path)
    assert out["deleted"] == [1] and out["latest"] == 2
    assert reg.resolve("maml-lora", tmp_path) == saved[1][1]
    # numbers are never reused, even after the top one was deleted
    v, _ = reg.save_version("maml-lora", _arrays(), {}, tmp_path)
    assert v == 4 and reg.latest_version("maml-lora", tmp_path) == 4
    # delete all
    out = reg.delete("maml-lora", tmp_path)
    assert out["deleted"] == [2, 4] and out["latest"] is None
    assert reg.list_weights(tmp_path) == []
    with pytest.raises(UserError):
        reg.resolve("maml-lora", tmp_path)
    with pytest.raises(UserError):
        reg.delete("maml-lora", tmp_path)
    assert reg.save_version("maml-lora", _arrays(), {}, tmp_path)[0] == 5


def test_compare(tmp_path):
    a = {"w": mx.array([[1.0, 2.0], [3.0, 4.0]]), "b": mx.array([0.0, 1.0])}
    b = {"w": mx.array([[1.0, 2.0], [3.0, 0.0]]), "b": mx.array([3.0, 1.0])}
    reg.save_version("x", a, {"algorithm": "maml", "lr": 0.1}, tmp_path)
    reg.save_version("x", b, {"algorithm": "reptile", "lr": 0.1}, tmp_path)
    c = reg.compare("x@1", "x@2", tmp_path)
    assert c["metadata_diff"] == {"algorithm": {"a": "maml", "b": "reptile"}}
    assert c["compatible"] and c["num_parameters"] == 6
    assert c["l2_distance"] == pytest.approx(5.0)  # sqrt(4^2 + 3^2)
    va, vb = np.array([0, 1, 1, 2, 3, 4.0]), np.array([3, 1, 1, 2, 3, 0.0])
    assert c["cosine_similarity"] == pytest.approx(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb))
    assert c["per_tensor_max_abs_diff"] == {"b": 3.0, "w": 4.0}
    assert c["max_abs_diff"]["max"] == 4.0 and c["max_abs_diff"]["tensor"] == "w"

    same = reg.compare("x@1", "x@v1", tmp_path)
    assert same["l2_distance"] == 0.0 and same["cosine_similarity"] == pytest.approx(1.0)

    reg.save_version("y", {"w": mx.zeros((3, 2)), "extra": mx.zeros((1,))}, {}, tmp_path)
    bad = reg.compare("x@1", "y", tmp_path)
    assert not bad["compatible"] and bad["l2_distance"] is None
    assert bad["shape_mismatch"] == {"w": [[2, 2], [3, 2]]}
    assert bad["only_in_a"] == ["b"] and bad["only_in_b"] == ["extra"]


@pytest.mark.parametrize("spec", ["", "-x", ".x", "a b", "a/b", "x@", "x@0", "x@v", "x@-1",
                                  "x@1.5", "x@vv2", "@3"])
def test_invalid_specs(tmp_path, spec):
    with pytest.raises(UserError):
        reg.resolve(spec, tmp_path)


def test_invalid_names(tmp_path):
    for name in ["", "_x", "a/b", "../up", "x@1", "é"]:
        with pytest.raises(UserError) as e:
            reg.save_version(name, _arrays(), {}, tmp_path)
        assert e.value.field == "name"
    with pytest.raises(UserError):
        reg.rollback("x", 0, tmp_path)
    assert not (tmp_path / "weights").exists() or list((tmp_path / "weights").iterdir()) == []


def test_path_like_init_message(tmp_path):
    with pytest.raises(UserError, match="neither an existing file nor a registry spec"):
        reg.resolve("runs/missing/adapters.safetensors", tmp_path)


def test_root_env(tmp_path, monkeypatch):
    monkeypatch.delenv("METAPEFT_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert reg.registry_root() == tmp_path / "xdg" / "metapeft"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert reg.registry_root() == tmp_path / "home" / ".local" / "share" / "metapeft"
    monkeypatch.setenv("METAPEFT_HOME", str(tmp_path / "mh"))
    assert reg.registry_root() == tmp_path / "mh"
    assert reg.registry_root(tmp_path / "explicit") == tmp_path / "explicit"
    v, p = reg.save_version("envtest", _arrays(), {})
    assert v == 1 and p == tmp_path / "mh" / "weights" / "envtest" / "v0001.safetensors"
    assert reg.resolve("envtest") == p


def _worker(root: str, k: int) -> list[int]:
    import mlx.core as mx  # the test module (imported first by the child) preloads metapeft

    from metapeft import registry

    return [registry.save_version("shared", {"w": mx.full((8,), float(k))}, {"worker": k},
                                  registry=root)[0] for _ in range(3)]


def test_concurrent_saves(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(_worker, [(str(tmp_path), k) for k in range(4)])
    got = sorted(v for r in results for v in r)
    assert got == list(range(1, 13))
    d = tmp_path / "weights" / "shared"
    assert reg.list_versions("shared", tmp_path) == list(range(1, 13))
    assert reg.latest_version("shared", tmp_path) in range(1, 13)
    assert not [p.name for p in d.iterdir() if ".tmp" in p.name]
    for v in range(1, 13):  # every file is complete and names its own version
        meta = read_metadata(reg.resolve(f"shared@{v}", tmp_path))
        assert meta["version"] == str(v)
    assert math.isfinite(reg.compare("shared@1", "shared@12", tmp_path)["l2_distance"])
