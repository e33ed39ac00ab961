import mlx.core as mx
import pytest

from metapeft.artifacts import load_safetensors, read_metadata, save_safetensors
from metapeft.errors import UserError


def test_round_trip_with_metadata(tmp_path):
    p = save_safetensors(tmp_path / "a.safetensors", {"x": mx.arange(4)}, {"k": "v", "n": [1, 2]})
    arrays, meta = load_safetensors(p)
    assert arrays["x"].tolist() == [0, 1, 2, 3] and meta["k"] == "v" and meta["n"] == "[1, 2]"
    assert read_metadata(p)["k"] == "v"
    assert [f.name for f in tmp_path.iterdir()] == ["a.safetensors"]  # no temp files left


def test_failed_write_keeps_previous(tmp_path, monkeypatch):
    p = save_safetensors(tmp_path / "a.safetensors", {"x": mx.zeros(2)}, {"v": "1"})

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", boom)
    with pytest.raises(RuntimeError):
        save_safetensors(p, {"x": mx.ones(2)}, {"v": "2"})
    assert read_metadata(p)["v"] == "1"
    assert len(list(tmp_path.iterdir())) == 1


def test_corrupt_file_is_user_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(UserError, match="not a safetensors"):
        load_safetensors(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_safetensors(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("name", ["studyz", "run.st", "x.tmp"])
def test_save_to_a_path_without_the_safetensors_suffix(tmp_path, name):
    """mx.save_safetensors appends ".safetensors" to a name without it; the atomic writer must
    still put the bytes at exactly ``path`` and leave no orphan temp file (issue 15: a study
    saved to out/studyz was an empty file next to an orphan .studyz.*.tmp.safetensors)."""
    p = save_safetensors(tmp_path / name, {"x": mx.arange(3)}, {"k": "v"})
    assert p == tmp_path / name and p.stat().st_size > 0
    arrays, meta = load_safetensors(p)
    assert arrays["x"].tolist() == [0, 1, 2] and meta["k"] == "v"
    assert [f.name for f in tmp_path.iterdir()] == [name]
