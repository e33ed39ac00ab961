"""benchmarks/wordnet_tasks.py: the second corpus (WordNet glosses by supersense) is parsed from
WordNet's own file format, and no meta-test (verb) label name is a meta-train label name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

LEXNAMES = "00\tadj.all\t3\n03\tnoun.Tops\t1\n05\tnoun.animal\t1\n08\tnoun.body\t1\n" \
           "29\tverb.body\t2\n38\tverb.motion\t2\n"
HEADER = "  1 This software and database is being provided to you | not a synset\n"


def _line(offset: int, lex: int, pos: str, word: str, gloss: str) -> str:
    return f"{offset:08d} {lex:02d} {pos} 01 {word} 0 000 | {gloss}  \n"


def _write_db(root: Path) -> Path:
    db = root / "dict"
    db.mkdir()
    (db / "lexnames").write_text(LEXNAMES)
    (db / "data.noun").write_text(HEADER + "".join([
        _line(1, 5, "n", "dog", 'a member of the genus Canis; "the dog barked all night"'),
        _line(2, 5, "n", "cat", "feline mammal usually having thick soft fur"),
        _line(3, 8, "n", "arm", "a human limb; technically the part between shoulder and elbow"),
        _line(4, 3, "n", "entity", "that which is perceived or known or inferred"),
        _line(5, 5, "n", "pup", "a young dog"),
        _line(9, 5, "n", "hound", "a dog; \"hounds hunt by scent\"")]))
    (db / "data.verb").write_text(HEADER + "".join([
        _line(6, 38, "v", "run", 'move fast by using one\'s feet; "Don\'t run--you\'ll be late"'),
        _line(7, 29, "v", "groom", "care for one's external appearance")]))
    (db / "data.adj").write_text(_line(8, 0, "a", "able", "having the necessary means or skill"))
    (db / "data.adv").write_text("")
    return db


def test_glosses_become_labelled_rows_and_shared_names_are_left_out(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(BENCH / "wordnet_tasks.py"), str(_write_db(tmp_path)),
                        str(out), "--test-fraction", "0"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert (out / "test.jsonl").read_text() == ""
    by_text = {r["text"]: (r["label"], r["domain"]) for r in rows}
    # the definition only: quoted examples dropped; glosses under 3 words dropped ("a young dog" stays)
    assert by_text == {
        "a member of the genus Canis": ("animal", "noun"),
        "feline mammal usually having thick soft fur": ("animal", "noun"),
        "that which is perceived or known or inferred": ("top concept", "noun"),
        "a young dog": ("animal", "noun"),
        "move fast by using one's feet": ("motion", "verb"),
        "care for one's external appearance": ("body", "verb"),
        "having the necessary means or skill": ("adjective", "adjective"),
    }  # noun.body is gone: "body" is a verb (meta-test) class's name


def test_a_missing_source_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, str(BENCH / "wordnet_tasks.py"), str(tmp_path / "nope"),
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "not found" in p.stderr
