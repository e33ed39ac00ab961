"""A task is a labelled few-shot problem: a support set to train on and a query set to score.

Readers accept either a directory in mlx-lm's convention (train.jsonl = support, valid.jsonl or
test.jsonl = query) or one JSONL/CSV pool from which a stratified N-way K-shot episode is drawn.
Every malformed input raises ``UserError`` naming the file, line and field.
"""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from metapeft.errors import UserError


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    # Extra columns (domain, project, intent, timestamp, rating, ...) are kept for later stages.
    extra: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Task:
    name: str
    support: list[Example]
    query: list[Example]
    labels: list[str]
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def label_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


def _decode(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError("file does not exist", path=str(path)) from None
    except IsADirectoryError:
        raise UserError("is a directory, expected a file", path=str(path)) from None
    lines = raw.split(b"\n")
    out = []
    for i, line in enumerate(lines, start=1):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"text is not valid UTF-8 (byte {e.start})", path=str(path), line=i) from None
    return out


def read_rows(path: str | Path, *, text_field: str = "text", label_field: str = "label",
              require_label: bool = True) -> list[Example]:
    """Read a JSONL or CSV file of labelled rows, validating every line."""
    path = Path(path)
    if path.is_dir():
        raise UserError("is a directory, expected a .jsonl or .csv file", path=str(path))
    lines = _decode(path)
    if not any(line.strip() for line in lines):
        raise UserError("file is empty", path=str(path))
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(lines)
        if reader.fieldnames is None:
            raise UserError("CSV has no header row", path=str(path), line=1)
        for row in reader:
            rows.append((reader.line_num, dict(row)))
    else:
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"malformed JSON ({e.msg} at column {e.colno})", path=str(path),
                                line=i) from None
            if not isinstance(obj, dict):
                raise UserError("expected a JSON object per line", path=str(path), line=i)
            rows.append((i, obj))
    examples = []
    for line_no, obj in rows:
        text = obj.get(text_field)
        if not isinstance(text, str) or not text.strip():
            raise UserError("missing or empty text", path=str(path), line=line_no, field=text_field)
        label = obj.get(label_field)
        if label is None or (isinstance(label, str) and not label.strip()):
            if require_label:
                raise UserError("missing label", path=str(path), line=line_no, field=label_field)
            label = ""
        extra = {k: v for k, v in obj.items() if k not in (text_field, label_field)}
        examples.append(Example(text=text.strip(), label=str(label).strip(), extra=extra))
    return examples


def _labels_of(examples: list[Example]) -> list[str]:
    return sorted({e.label for e in examples})


def sample_episode(pool: list[Example], *, ways: int | None, shots: int, query: int, seed: int,
                   source: str = "pool", labels: list[str] | None = None) -> Task:
    """Draw a stratified N-way K-shot episode with ``query`` examples per class."""
    by_label: dict[str, list[Example]] = defaultdict(list)
    for e in pool:
        by_label[e.label].append(e)
    rng = random.Random(seed)
    available = sorted(by_label) if labels is None else list(labels)
    if len(available) < 2:
        raise UserError(f"a task needs at least 2 classes, found {len(available)}", path=source,
                        field="label")
    if ways is not None:
        if ways < 2:
            raise UserError("--ways must be at least 2", field="ways")
        if ways > len(available):
            raise UserError(f"--ways {ways} but only {len(available)} labels are available",
                            path=source, field="label")
        chosen = sorted(rng.sample(available, ways))
    else:
        chosen = sorted(available)
    need = shots + query
    for label in chosen:
        have = len(by_label[label])
        if have < need:
            raise UserError(f"label '{label}' has {have} examples, needs {need} for --shots {shots} "
                            f"--query {query}", path=source, field="label")
    support, query_set = [], []
    for label in chosen:
        picked = rng.sample(by_label[label], need)
        support.extend(picked[:shots])
        query_set.extend(picked[shots:])
    rng.shuffle(support)
    rng.shuffle(query_set)
    return Task(name=f"{Path(source).stem}-{len(chosen)}w{shots}s-seed{seed}", support=support,
                query=query_set, labels=chosen,
                meta={"source": source, "ways": len(chosen), "shots": shots, "query": query,
                      "seed": seed})


def _check_classes(examples: list[Example], path: Path) -> None:
    labels = _labels_of(examples)
    if len(labels) < 2:
        raise UserError(f"a task needs at least 2 classes, found {len(labels)} ({labels[0]!r})",
                        path=str(path), field="label")


def load_task(path: str | Path, *, shots: int | None = None, query: int | None = None,
              ways: int | None = None, seed: int = 0, text_field: str = "text",
              label_field: str = "label") -> Task:
    """Load a task from an mlx-lm style directory or draw an episode from a single file."""
    path = Path(path)
    if not path.exists():
        raise UserError("task path does not exist", path=str(path))
    if path.is_dir():
        train = path / "train.jsonl"
        if not train.exists():
            raise UserError("directory has no train.jsonl (the support set)", path=str(path))
        query_file = next((path / n for n in ("valid.jsonl", "test.jsonl") if (path / n).exists()),
                          None)
        if query_file is None:
            raise UserError("directory has no valid.jsonl or test.jsonl (the query set)",
                            path=str(path))
        support = read_rows(train, text_field=text_field, label_field=label_field)
        query_set = read_rows(query_file, text_field=text_field, label_field=label_field)
        _check_classes(support, train)
        labels = _labels_of(support)
        unknown = sorted(set(_labels_of(query_set)) - set(labels))
        if unknown:
            raise UserError(f"query labels {unknown} never appear in the support set",
                            path=str(query_file), field=label_field)
        return Task(name=path.name, support=support, query=query_set, labels=labels,
                    meta={"source": str(path)})
    pool = read_rows(path, text_field=text_field, label_field=label_field)
    _check_classes(pool, path)
    if shots is None:
        raise UserError("a single-file task needs --shots (and --query) to draw an episode",
                        path=str(path), field="shots")
    return sample_episode(pool, ways=ways, shots=shots, query=query if query is not None else 10,
                          seed=seed, source=str(path))
