"""A task is a labelled few-shot problem: a support set to train on and a query set to score.

This module holds the types and the validating readers: ``read_rows`` (a JSONL/CSV file of
labelled rows) and ``read_task_dir`` (a directory in mlx-lm's convention: train.jsonl = support,
valid.jsonl or test.jsonl = query). Drawing episodes from a pool, and ``load_task``, which does
either, live in ``metapeft.data.episodes``. Every malformed input raises ``UserError`` naming the
file, line and field.
"""

from __future__ import annotations

import csv
import json
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


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; a missing file or bad byte raises ``UserError``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError("file does not exist", path=str(path)) from None
    except IsADirectoryError:
        raise UserError("is a directory, expected a file", path=str(path)) from None
    return decode_lines(raw, str(path))


def decode_lines(raw: bytes, source: str) -> list[str]:
    """``raw`` (a file's or standard input's bytes) as UTF-8 lines; a bad byte raises
    ``UserError`` naming ``source`` and the line."""
    lines = raw.split(b"\n")
    out = []
    for i, line in enumerate(lines, start=1):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"text is not valid UTF-8 (byte {e.start})", path=source, line=i) from None
    return out


def jsonl_objects(lines: list[str], source: str) -> list[tuple[int, dict]]:
    """Each non-blank line of JSONL ``lines`` parsed, with its line number; anything but a JSON
    object raises ``UserError`` naming ``source`` and the line."""
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"malformed JSON ({e.msg} at column {e.colno})", path=source,
                            line=i) from None
        if not isinstance(obj, dict):
            raise UserError("expected a JSON object per line", path=source, line=i)
        rows.append((i, obj))
    return rows


def read_rows(path: str | Path, *, text_field: str = "text", label_field: str = "label",
              require_label: bool = True, lines: list[str] | None = None,
              fmt: str | None = None, with_lines: bool = False) -> list[Example]:
    """Read a JSONL or CSV file of labelled rows, validating every line.

    ``require_label=False`` reads unlabelled rows (their label is ""). ``lines`` (standard
    input's, say) are read instead of the file, and ``path`` only names them in errors; ``fmt``
    (``jsonl`` or ``csv``) overrides the suffix; ``with_lines`` keeps each row's line number in
    ``extra["_line"]``."""
    path = Path(path)
    if lines is None:
        if path.is_dir():
            raise UserError("is a directory, expected a .jsonl or .csv file", path=str(path))
        lines = read_lines(path)
    if not any(line.strip() for line in lines):
        raise UserError("file is empty", path=str(path))
    rows: list[tuple[int, dict]] = []
    if (fmt or path.suffix.lower().lstrip(".")) == "csv":
        reader = csv.DictReader(lines)
        try:
            if reader.fieldnames is None:
                raise UserError("CSV has no header row", path=str(path), line=1)
            for row in reader:
                rows.append((reader.line_num, dict(row)))
        except csv.Error as e:  # e.g. a bare carriage return inside an unquoted field
            raise UserError(f"malformed CSV ({e})", path=str(path),
                            line=reader.line_num or 1) from None
    else:
        rows = jsonl_objects(lines, str(path))
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
        if with_lines:
            extra["_line"] = line_no
        examples.append(Example(text=text.strip(), label=str(label).strip(), extra=extra))
    return examples


def labels_of(examples: list[Example]) -> list[str]:
    return sorted({e.label for e in examples})


def check_classes(examples: list[Example], path: Path) -> None:
    labels = labels_of(examples)
    if len(labels) < 2:
        raise UserError(f"a task needs at least 2 classes, found {len(labels)} ({labels[0]!r})",
                        path=str(path), field="label")


def read_task_dir(path: str | Path, *, text_field: str = "text",
                  label_field: str = "label") -> Task:
    """A task from an mlx-lm style directory: train.jsonl (support), valid.jsonl or test.jsonl
    (query); every query label must occur in the support set."""
    path = Path(path)
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
    check_classes(support, train)
    labels = labels_of(support)
    unknown = sorted(set(labels_of(query_set)) - set(labels))
    if unknown:
        raise UserError(f"query labels {unknown} never appear in the support set",
                        path=str(query_file), field=label_field)
    return Task(name=path.name, support=support, query=query_set, labels=labels,
                meta={"source": str(path)})
