"""Pool filters: which examples of a labelled pool an episode source may draw from.

``filter_pool(pool, *, domains=None, exclude_domains=None, labels_from=None,
exclude_labels=None, domain_field="domain") -> list[Example]``
    Keeps the examples of ``pool`` that pass every given filter, in their original order:

    * ``domains`` -- keep only examples whose ``Example.extra[domain_field]`` is one of these;
    * ``exclude_domains`` -- drop examples whose domain is one of these;
    * ``labels_from`` -- a path: either a plain text file listing labels one per line (blank
      lines and lines starting with ``#`` are ignored) or a JSONL/CSV pool (``.jsonl``, ``.json``,
      ``.csv``, or any file whose first non-blank line starts with ``{``) whose labels are taken;
      keep only examples with one of those labels;
    * ``exclude_labels`` -- drop examples with one of these label names.

    A domain name (in ``domains`` or ``exclude_domains``) that no example carries raises
    ``UserError`` listing the available domains (field ``domain_field``); so does asking for
    domains when no example has a ``domain_field`` column. An empty result raises ``UserError``.

``split_classes_by_domain(pool, val_domains, domain_field="domain") -> (train, val)``
    The meta-train and validation labels when whole domains are held out for validation:
    ``val`` is every label of the examples in ``val_domains``, ``train`` every other label
    (both sorted). This mirrors a meta-test on held-out domains, where ``split_classes`` draws
    validation classes from inside the meta-train domains. A domain no example carries, a label
    found both inside and outside ``val_domains``, or fewer than 2 labels on either side raises
    ``UserError``.

``read_label_list(path) -> list[str]``
    The labels ``labels_from`` names (sorted, distinct).

``class_overlap(a, b) -> set[str]``
    The labels two collections share. Each side may be an iterable of label strings or of
    ``Example`` objects (their labels are used), e.g. ``class_overlap(train_pool, val_pool)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from metapeft.data.tasks import Example, read_lines, read_rows
from metapeft.errors import UserError

__all__ = ["class_overlap", "filter_pool", "read_label_list", "split_classes_by_domain"]


def _looks_like_pool(path: Path, lines: list[str]) -> bool:
    if path.suffix.lower() in (".jsonl", ".json", ".csv"):
        return True
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    return first.startswith("{")


def read_label_list(path: str | Path) -> list[str]:
    """Labels named by ``path``: a one-per-line list or a JSONL/CSV pool (sorted, distinct)."""
    path = Path(path)
    if path.is_dir():
        raise UserError("is a directory, expected a label list or a pool file", path=str(path))
    lines = read_lines(path)
    if _looks_like_pool(path, lines):
        # read_rows treats every non-.csv suffix as JSONL.
        labels = {e.label for e in read_rows(path)}
    else:
        labels = {ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")}
    if not labels:
        raise UserError("lists no labels", path=str(path))
    return sorted(labels)


def _domain_of(e: Example, domain_field: str):
    value = e.extra.get(domain_field)
    return None if value is None else str(value)


def _require_domains(pool, asked, domain_field: str, *, what: str = "domain(s)",
                     field: str | None = None) -> None:
    """Every name in ``asked`` is a domain some example of ``pool`` carries, else one line."""
    available = sorted({d for e in pool if (d := _domain_of(e, domain_field)) is not None})
    if not available:
        raise UserError(f"no example has a '{domain_field}' column to filter domains on",
                        field=domain_field)
    unknown = sorted(set(asked) - set(available))
    if unknown:
        raise UserError(f"unknown {what} {unknown}; available domains: {available}",
                        field=field or domain_field)


def filter_pool(pool: Sequence[Example], *, domains: Iterable[str] | None = None,
                exclude_domains: Iterable[str] | None = None,
                labels_from: str | Path | None = None,
                exclude_labels: Iterable[str] | None = None,
                domain_field: str = "domain") -> list[Example]:
    """Keep the examples of ``pool`` that pass the domain and label filters (see module doc)."""
    pool = list(pool)
    domains = None if domains is None else [str(d) for d in domains]
    exclude_domains = None if exclude_domains is None else [str(d) for d in exclude_domains]
    if domains is not None or exclude_domains is not None:
        _require_domains(pool, (domains or []) + (exclude_domains or []), domain_field)
    keep_labels = None if labels_from is None else set(read_label_list(labels_from))
    drop_labels = set() if exclude_labels is None else {str(x).strip() for x in exclude_labels}
    keep_domains = None if domains is None else set(domains)
    drop_domains = set() if exclude_domains is None else set(exclude_domains)
    out = []
    for e in pool:
        d = _domain_of(e, domain_field)
        if keep_domains is not None and d not in keep_domains:
            continue
        if d is not None and d in drop_domains:
            continue
        if keep_labels is not None and e.label not in keep_labels:
            continue
        if e.label in drop_labels:
            continue
        out.append(e)
    if not out:
        raise UserError("no examples are left after the domain/label filters", field="label")
    return out


def _label_set(x) -> set[str]:
    return {e.label if isinstance(e, Example) else str(e) for e in x}


def class_overlap(a: Iterable, b: Iterable) -> set[str]:
    """Labels shared by ``a`` and ``b`` (each labels or ``Example`` objects)."""
    return _label_set(a) & _label_set(b)


def split_classes_by_domain(pool: Sequence[Example], val_domains: Iterable[str],
                            domain_field: str = "domain") -> tuple[list[str], list[str]]:
    """(meta-train labels, validation labels) with ``val_domains`` held out whole (module doc)."""
    val_domains = [str(d) for d in val_domains]
    _require_domains(pool, val_domains, domain_field, what="validation domain(s)",
                     field="val_domains")
    held = set(val_domains)
    inside, outside = set(), set()
    for e in pool:
        (inside if _domain_of(e, domain_field) in held else outside).add(e.label)
    if inside & outside:
        both = sorted(inside & outside)
        raise UserError(f"label(s) {both[:3]}{' ...' if len(both) > 3 else ''} occur both inside "
                        f"and outside the validation domains {val_domains}: a class cannot be on "
                        f"both sides", field="val_domains")
    if len(inside) < 2 or len(outside) < 2:
        raise UserError(f"validation domains {val_domains} leave {len(outside)} meta-train and "
                        f"{len(inside)} validation classes; each side needs at least 2",
                        field="val_domains")
    return sorted(outside), sorted(inside)
