"""The adapter library: trained adapters kept under ``<registry root>/library/`` for reuse as the
starting point of new tasks (``adapt --init library:compose``, ``adapt --route arrow``).

One entry is one safetensors file, ``library/ID.safetensors``: the adapter's tensors as
``adapt --out`` wrote them, and in the header the adapter's own metadata (method, config, base
model id and fingerprint, labels, provenance) plus ``library``, a JSON object:

``id``            the first 12 hex digits of the SHA-256 of the tensors (adding the same adapter
                  twice is a no-op)
``score``         the adapter's final query accuracy (its provenance), NaN when unknown
``task``          the task's name; ``source``: the directory it was added from
``embedding``     the task's content embedding (``task_embedding``): the frozen base model's
                  final hidden states mean-pooled over each support text's prompt, L2-normalised
                  per text, averaged and normalised again; present when the task was given
``label_embedding`` the same over the label verbalisations only: always present (an adapter
                  directory names its labels), so entries added without their task can be
                  compared too
``features``      the selector's task profile (``select.features``) when the task was given
``composable``    true for plain LoRA; otherwise false with ``reason`` (the adapter protocol's
                  ``compose_refusal``: DoRA's magnitude, AdaLoRA's masked SVD form and the
                  virtual-token and prototype methods have no A/B pair that a sum can mix)

Similarity of two tasks (``similarity``) is the cosine of their content embeddings when both
have one, else of their label embeddings; only entries on the same base model (fingerprint)
are compared. ``--max-size N`` bounds the library: while it holds more than N entries, the most
similar pair of entries (the nearest near-duplicates) loses its lower-scoring member; entries no
other entry can be compared with are evicted worst score first only when no pair is left.

Compositions found by ``library:compose`` are kept in ``library/compositions.json`` (task,
embedding, the weight of every member by entry id, the support loss) to warm-start the next
search on a similar task. The step sizes calibrated for composed starts
(``compose.calibrate_step_size``, ``metapeft library calibrate``) are kept in
``library/step_sizes.json``, and the weight bounds calibrated for merges
(``compose.calibrate_merge_bound``) in ``library/merge_bounds.json``, each one record per spec,
base model and LoRA config. Writers hold ``library/.lock``; every file is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metapeft.errors import UserError

LIBRARY_DIR = "library"
COMPOSITIONS = "compositions.json"
STEP_SIZES = "step_sizes.json"
MERGE_BOUNDS = "merge_bounds.json"
def library_dir(registry=None) -> Path:
    from metapeft.registry import registry_root

    return registry_root(registry) / LIBRARY_DIR


def composable_reason(method: str, config: dict) -> str | None:
    """None when an adapter of ``method`` with ``config`` can be composed, else why not (the
    adapter protocol's ``compose_refusal``)."""
    from metapeft.adapters import get_adapter_class
    from metapeft.adapters.stacked import STACK_METHOD, Stacked

    try:  # a stack (adapt --switch, library:merge) is no user-chosen method, yet a known one
        cls = Stacked if method == STACK_METHOD else get_adapter_class(method)
    except UserError:
        return f"unknown method {method!r}"
    return cls.compose_refusal(config)


@dataclass
class Entry:
    id: str
    path: Path
    method: str
    config: dict
    base_model: str | None
    base_model_hash: str | None
    task: str | None
    score: float
    composable: bool
    reason: str | None
    embedding: list[float] | None = None
    label_embedding: list[float] | None = None
    features: list[float] | None = None
    labels: list[str] | None = None
    source: str | None = None
    added: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self, full: bool = False) -> dict:
        out = {"id": self.id, "path": str(self.path), "method": self.method,
               "base_model": self.base_model, "base_model_hash": self.base_model_hash,
               "task": self.task, "score": None if math.isnan(self.score) else self.score,
               "composable": self.composable, "reason": self.reason,
               "rank": self.config.get("rank"), "labels": self.labels, "source": self.source,
               "added": self.added, "bytes": self.path.stat().st_size if self.path.exists()
               else None}
        if full:
            out.update(config=self.config, embedding=self.embedding,
                       label_embedding=self.label_embedding, features=self.features)
        return out

    def load(self) -> dict:
        """The entry's tensors, by flat parameter name."""
        from metapeft.artifacts import load_safetensors

        return load_safetensors(self.path)[0]


def _entry_from_header(path: Path, meta: dict) -> Entry:
    from metapeft.artifacts import json_field

    lib = json_field(meta, "library")
    if not isinstance(lib, dict) or "id" not in lib:
        raise UserError("not a library entry (no 'library' header)", path=str(path),
                        field="library")
    config = json_field(meta, "config") or {}
    score = lib.get("score")
    return Entry(id=lib["id"], path=path, method=meta.get("method", "?"),
                 config=config if isinstance(config, dict) else {},
                 base_model=meta.get("base_model"), base_model_hash=meta.get("base_model_hash"),
                 task=lib.get("task"), score=float("nan") if score is None else float(score),
                 composable=bool(lib.get("composable")), reason=lib.get("reason"),
                 embedding=lib.get("embedding"), label_embedding=lib.get("label_embedding"),
                 features=lib.get("features"), labels=json_field(meta, "labels"),
                 source=lib.get("source"), added=lib.get("added"))


def entries(registry=None) -> list[Entry]:
    """Every entry of the library, oldest first (an empty list when there is none)."""
    from metapeft.artifacts import read_metadata

    d = library_dir(registry)
    if not d.is_dir():
        return []
    out = [_entry_from_header(p, read_metadata(p)) for p in sorted(d.glob("*.safetensors"))]
    return sorted(out, key=lambda e: (e.added or "", e.id))


def find(spec: str, registry=None) -> Entry:
    """The entry whose id starts with ``spec`` (one line when none or several match)."""
    hits = [e for e in entries(registry) if e.id.startswith(spec)] if spec else []
    if len(hits) != 1:
        raise UserError(f"no library entry with id {spec!r}" if not hits else
                        f"{len(hits)} library entries start with {spec!r}; give more of the id",
                        path=str(library_dir(registry)), field="id")
    return hits[0]


# ------------------------------------------------------------------------------- embeddings
def _pooled_mean(base, texts: list[str], labels: list[str]) -> list[float]:
    """Normalised mean of the per-text normalised pooled final hidden states (the prototype
    method's embedding) of ``texts`` under the base model's prompt template."""
    import mlx.core as mx

    from metapeft.adapters.prototype import _normalise, pooled_states
    from metapeft.data.tasks import Example
    from metapeft.scoring import TaskEncoder

    enc = TaskEncoder(base.tokenizer, labels)
    rows = []
    for i in range(0, len(texts), 32):
        batch = enc.encode([Example(t, labels[0]) for t in texts[i:i + 32]])
        rows.append(_normalise(pooled_states(base.model, batch)))
    v = _normalise(mx.concatenate(rows).mean(axis=0))
    return [round(float(x), 6) for x in np.asarray(v)]


def label_embedding(base, labels: list[str], verbalisations: list[str] | None = None
                    ) -> list[float]:
    from metapeft.scoring import verbalise

    texts = list(verbalisations) if verbalisations else [verbalise(lb) for lb in labels]
    return _pooled_mean(base, texts, list(labels))


def task_embedding(base, task) -> list[float]:
    return _pooled_mean(base, [e.text for e in task.support], list(task.labels))


def similarity(query: dict, entry: Entry) -> float:
    """Cosine of the content embeddings when both have one, else of the label embeddings
    (``query``: {"embedding", "label_embedding"}); -inf when neither pair compares."""
    for a, b in ((query.get("embedding"), entry.embedding),
                 (query.get("label_embedding"), entry.label_embedding)):
        if a is not None and b is not None and len(a) == len(b):
            return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
    return -math.inf


def profile(base, task=None, labels=None, verbalisations=None) -> dict:
    """The query side of ``similarity`` for a task (or just its labels)."""
    out = {"label_embedding": label_embedding(base, list(task.labels) if task else labels,
                                              None if task else verbalisations)}
    if task is not None:
        out["embedding"] = task_embedding(base, task)
    return out


# ------------------------------------------------------------------------------- writing
def _content_id(arrays: dict) -> str:
    import mlx.core as mx

    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        v = arrays[k]
        h.update(np.asarray(v.astype(mx.float32) if hasattr(v, "astype") and not isinstance(
            v, np.ndarray) else v, dtype=np.float32).tobytes())
    return h.hexdigest()[:12]


@dataclass
class AddResult:
    entry: Entry
    added: bool  # False: the same adapter was already in the library
    evicted: list[dict]

    def to_json(self) -> dict:
        return {"entry": self.entry.to_json(), "added": self.added, "evicted": self.evicted}


def add(adapter_dir, *, task=None, base=None, registry=None, max_size: int | None = None,
        model: str | None = None, dequantize: str = "auto", source: str | None = None
        ) -> AddResult:
    """Put the adapter of ``adapter_dir`` (written by ``adapt --out``) into the library with
    its task profile (``task``: the task it was trained on, optional), then evict down to
    ``max_size``. ``base``: the loaded base model, else the one its header names (or
    ``model``), which must have the adapter's fingerprint."""
    from datetime import datetime, timezone

    from metapeft.adapter_io import check_base_model, read_adapter, read_adapter_info
    from metapeft.artifacts import file_lock, save_safetensors

    if max_size is not None and max_size < 1:
        raise UserError(f"--max-size must be >= 1, got {max_size}", field="max_size")
    weights, arrays, meta, method = read_adapter(adapter_dir)
    info = read_adapter_info(adapter_dir)
    if base is None:
        from metapeft.models import DEFAULT_MODEL, load_base_model

        base = load_base_model(model or info.base_model or DEFAULT_MODEL, dequantize=dequantize)
    check_base_model(meta, base, str(weights))
    labels = info.labels or (list(task.labels) if task is not None else None)
    if not labels:
        raise UserError("the adapter names no labels; give its --task", path=str(weights),
                        field="labels")
    reason = composable_reason(method, info.config)
    lib = {"id": _content_id(arrays), "score": info.provenance.get("final_accuracy"),
           "task": info.task or (task.name if task is not None else None),
           "source": source or str(Path(adapter_dir)), "composable": reason is None, "reason": reason,
           "added": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
           "label_embedding": label_embedding(base, labels, info.verbalisations)}
    if lib["score"] is not None and not math.isfinite(float(lib["score"])):
        lib["score"] = None
    if task is not None:
        from metapeft.tune.warm_start import task_feature_vector

        lib["embedding"] = task_embedding(base, task)
        lib["features"] = task_feature_vector(task, base)
    d = library_dir(registry)
    d.mkdir(parents=True, exist_ok=True)
    with file_lock(d / ".lock"):
        existing = {e.id: e for e in entries(registry)}
        if lib["id"] in existing:
            added, entry = False, existing[lib["id"]]
        else:
            path = d / f"{lib['id']}.safetensors"
            save_safetensors(path, arrays, {**meta, "library": json.dumps(lib)})
            added, entry = True, _entry_from_header(path, {**meta, "library": json.dumps(lib)})
        evicted = evict(max_size, registry) if max_size is not None else []
    return AddResult(entry=entry, added=added, evicted=evicted)


def evict(max_size: int, registry=None) -> list[dict]:
    """Remove entries until at most ``max_size`` remain: each time the most similar pair (same
    base model) loses its lower-scoring member (ties: the newer); with no comparable pair, the
    worst-scoring entry. Call with the library's lock held. Returns what was removed."""
    es = entries(registry)
    out = []

    def score(e):
        return -math.inf if math.isnan(e.score) else e.score

    while len(es) > max_size:
        best, pair = -math.inf, None
        for i, a in enumerate(es):
            q = {"embedding": a.embedding, "label_embedding": a.label_embedding}
            for b in es[i + 1:]:
                if a.base_model_hash != b.base_model_hash:
                    continue
                s = similarity(q, b)
                if s > best:
                    best, pair = s, (a, b)
        if pair is not None:
            a, b = pair
            victim = a if score(a) < score(b) else b
            why = f"near-duplicate of {(b if victim is a else a).id} (cosine {best:.3f})"
        else:
            victim = min(es, key=score)
            why = "lowest score"
        victim.path.unlink(missing_ok=True)
        es.remove(victim)
        out.append({"id": victim.id, "task": victim.task, "score": victim.to_json()["score"],
                    "reason": why})
    return out


def remove(spec: str, registry=None) -> dict:
    from metapeft.artifacts import file_lock

    d = library_dir(registry)
    with file_lock(d / ".lock"):
        e = find(spec, registry)
        e.path.unlink()
    return e.to_json()


# ------------------------------------------------------------------------------- composing
# options whose difference makes two LoRAs' A/B tensors mean different things
STRUCTURE = ("rank", "alpha", "target_modules", "num_layers", "use_rslora", "use_dora")


def candidates(adapter, registry=None) -> tuple[list, list[dict]]:
    """(usable entries with their tensors, skipped entries with the reason): usable means
    composable, on this adapter's base model (fingerprint) and with its LoRA structure. One-line
    errors for an empty library and for one with nothing usable."""
    es = entries(registry)
    where = str(library_dir(registry))
    if not es:
        raise UserError("the adapter library is empty; fill it with `metapeft library add DIR`,"
                        " `adapt --keep` or `metapeft library build`", path=where,
                        field="library")
    refusal = type(adapter).compose_refusal(adapter.config.to_dict())
    if refusal is not None:
        raise UserError(f"library composition and routing take plain LoRA: {refusal}",
                        field="method")
    want_cfg = adapter.config.to_dict()
    want = {k: tuple(v.shape) for k, v in adapter.flat(adapter.init_params(0)).items()}
    usable, skipped = [], []
    for e in es:
        why = None
        if not e.composable:
            why = e.reason or "not composable"
        elif e.base_model_hash != adapter.base.fingerprint:
            why = f"base model {e.base_model} ({e.base_model_hash}), not {adapter.base.model_id}"
        else:
            diff = [k for k in STRUCTURE if e.config.get(k, want_cfg.get(k)) != want_cfg.get(k)]
            if diff:
                why = "LoRA structure differs: " + ", ".join(
                    f"{k} {e.config.get(k)} vs {want_cfg.get(k)}" for k in diff)
        arrays = None
        if why is None:
            arrays = e.load()
            got = {k: tuple(v.shape) for k, v in arrays.items()}
            if got != want:
                why = "parameter names or shapes differ from this adapter's"
        if why is None:
            usable.append((e, arrays))
        else:
            skipped.append({"id": e.id, "task": e.task, "method": e.method, "reason": why})
    if not usable:
        reasons = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3])
        raise UserError(f"no library adapter fits this LoRA on {adapter.base.model_id} "
                        f"({len(skipped)} skipped: {reasons})", path=where, field="library")
    return usable, skipped


# ------------------------------------------------------------------------------- compositions
def compositions(registry=None) -> list[dict]:
    p = library_dir(registry) / COMPOSITIONS
    if not p.exists():
        return []
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return data if isinstance(data, list) else []


def record_composition(record: dict, registry=None, keep: int = 500) -> None:
    """Append a composition (task, embedding, weights by entry id, loss) under the lock; the
    newest ``keep`` are kept."""
    from metapeft.artifacts import atomic_write_json, file_lock

    d = library_dir(registry)
    d.mkdir(parents=True, exist_ok=True)
    with file_lock(d / ".lock"):
        atomic_write_json(d / COMPOSITIONS, (compositions(registry) + [record])[-keep:])


# ------------------------------------------------------------------------------- step sizes
def _calibrations(name: str, registry=None) -> list[dict]:
    p = library_dir(registry) / name
    try:
        data = json.loads(p.read_text()) if p.exists() else []
    except (OSError, json.JSONDecodeError):
        return []
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def _same_setting(a: dict, b: dict) -> bool:
    return all(a.get(f) == b.get(f) for f in ("key", "base_model_hash", "config"))


def _record_calibration(name: str, record: dict, registry=None) -> None:
    """Keep ``record`` in ``name`` under the lock, replacing an older one for the same spec,
    base model and config (``key``, ``base_model_hash``, ``config``)."""
    from metapeft.artifacts import atomic_write_json, file_lock

    d = library_dir(registry)
    d.mkdir(parents=True, exist_ok=True)
    with file_lock(d / ".lock"):
        kept = [r for r in _calibrations(name, registry) if not _same_setting(r, record)]
        atomic_write_json(d / name, kept + [record])


def _find_calibration(name: str, key: str, base_model_hash: str, config: dict,
                      registry=None) -> dict | None:
    probe = {"key": key, "base_model_hash": base_model_hash, "config": config}
    found = [r for r in _calibrations(name, registry) if _same_setting(r, probe)]
    return found[-1] if found else None


def step_sizes(registry=None) -> list[dict]:
    """The calibrated step sizes for composed starts (``compose.calibrate_step_size``)."""
    return _calibrations(STEP_SIZES, registry)


def record_step_size(record: dict, registry=None) -> None:
    """Keep a step-size record, replacing an older one for the same spec, base model and
    config."""
    _record_calibration(STEP_SIZES, record, registry)


def find_step_size(key: str, base_model_hash: str, config: dict, registry=None) -> dict | None:
    """The step-size record for this composition spec, base model and LoRA config, or None."""
    return _find_calibration(STEP_SIZES, key, base_model_hash, config, registry)


def merge_bounds(registry=None) -> list[dict]:
    """The weight bounds calibrated for merges (``compose.calibrate_merge_bound``)."""
    return _calibrations(MERGE_BOUNDS, registry)


def record_merge_bound(record: dict, registry=None) -> None:
    """Keep a merge-bound record, replacing an older one for the same spec, base model and
    config."""
    _record_calibration(MERGE_BOUNDS, record, registry)


def find_merge_bound(key: str, base_model_hash: str, config: dict, registry=None
                     ) -> dict | None:
    """The merge-bound record for this merge spec, base model and LoRA config, or None."""
    return _find_calibration(MERGE_BOUNDS, key, base_model_hash, config, registry)


def disk_bytes(registry=None) -> int:
    d = library_dir(registry)
    return sum(p.stat().st_size for p in d.glob("*")) if d.is_dir() else 0


@dataclass
class BuildResult:
    added: int
    entries: int
    seconds: float
    disk_bytes: int
    tasks: list[dict]
    evicted: list[dict]

    def to_json(self) -> dict:
        return dict(self.__dict__)
