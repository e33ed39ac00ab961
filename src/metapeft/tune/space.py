"""Search spaces for ``metapeft tune``: ``configs/search_spaces.yaml`` -> skopt dimensions.

Design: one skopt space per study. A single-method study has that method's parameters. A
multi-method study has one ``method`` Categorical plus the *union* of the chosen methods'
parameters, each named ``METHOD.PARAM`` (so LoRA's lr and prompt tuning's lr are separate
dimensions with their own bounds). A trial only reads the parameters of its own method; the
others are "inactive" and ignored. This flat encoding keeps one GP over everything (so the
surrogate can learn which method is better), at the price of inactive dimensions that the GP
sees as noise; with at most ~20 dimensions that is what AutoPEFT-style searches do too. For
points that did not come from skopt (defaults, warm-start configs) the inactive dimensions are
filled with the centre of their range (geometric centre for log-uniform) so they are valid
points of the space.

Parameters named ``lr`` and ``steps`` go to ``adapt(lr=, steps=)``; everything else becomes an
adapter option (``adapt(config=...)``) and is checked against the method's Config dataclass.
Everything method-specific comes from the adapter protocol (``metapeft.adapters``): the options a
method has (``Config.defaults()``), their defaults (``Adapter.default_hyperparameters()``) and how
independently drawn options are made consistent (``Config.repair``).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metapeft.adapters import get_adapter_class
from metapeft.errors import UserError

SPACE_FILE = "search_spaces.yaml"  # in configs/, read through metapeft.config
TRAIN_KEYS = ("lr", "steps")  # parameters that are adapt() arguments, not adapter options
COMMON_KEYS = ("steps",)
TYPES = ("real", "int", "categorical")
PRIORS = ("uniform", "log-uniform")


@dataclass
class Param:
    """One searchable parameter (``name`` is the plain option name, e.g. ``rank``)."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    prior: str = "uniform"
    choices: list | None = None

    def to_dict(self) -> dict:
        if self.type == "categorical":
            return {"type": "categorical", "choices": list(self.choices or [])}
        return {"type": self.type, "low": self.low, "high": self.high, "prior": self.prior}

    # skopt's Categorical wants hashable, comparable labels; non-string choices (bools, numbers)
    # are labelled by their JSON text and mapped back on decode.
    def labels(self) -> list[str]:
        return [c if isinstance(c, str) else json.dumps(c) for c in self.choices or []]

    def dimension(self, full_name: str):
        from skopt.space import Categorical, Integer, Real

        if self.type == "real":
            return Real(float(self.low), float(self.high), prior=self.prior, name=full_name)
        if self.type == "int":
            return Integer(int(self.low), int(self.high), prior=self.prior, name=full_name)
        return Categorical(self.labels(), name=full_name)

    def to_x(self, value: Any):
        """A value as a point coordinate, projected into the range (None: the centre)."""
        if self.type == "categorical":
            labels = self.labels()
            lab = value if isinstance(value, str) else json.dumps(value)
            return lab if lab in labels else labels[0]
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            value = self.centre()
        v = min(max(float(value), float(self.low)), float(self.high))
        return int(round(v)) if self.type == "int" else v

    def from_x(self, v: Any):
        if self.type == "categorical":
            labels = self.labels()
            v = str(v)
            return self.choices[labels.index(v)] if v in labels else v
        if self.type == "int":
            return int(v)
        return float(v)

    def centre(self) -> float:
        lo, hi = float(self.low), float(self.high)
        c = math.sqrt(lo * hi) if self.prior == "log-uniform" else (lo + hi) / 2
        return round(c) if self.type == "int" else c


@dataclass
class SearchSpace:
    """The study's space: ``methods`` (in order), their parameters, shared ``common`` params."""

    methods: list[str]
    params: dict[str, dict[str, Param]]
    common: dict[str, Param] = field(default_factory=dict)
    fixed: dict[str, dict] = field(default_factory=dict)  # method -> options pinned (e.g. --init)
    source: str = SPACE_FILE

    # ------------------------------------------------------------------ the skopt view
    @property
    def multi(self) -> bool:
        return len(self.methods) > 1

    def entries(self) -> list[tuple[str, str | None, Param | None]]:
        """(dimension name, method or None, Param or None for the method dimension)."""
        out: list[tuple[str, str | None, Param | None]] = []
        if self.multi:
            out.append(("method", None, None))
        for name, p in self.common.items():
            out.append((name, None, p))
        for m in self.methods:
            for name, p in self.params[m].items():
                out.append((f"{m}.{name}" if self.multi else name, m, p))
        return out

    @property
    def names(self) -> list[str]:
        return [e[0] for e in self.entries()]

    def dimensions(self) -> list:
        from skopt.space import Categorical

        dims = []
        for name, _, p in self.entries():
            dims.append(Categorical(list(self.methods), name="method") if p is None
                        else p.dimension(name))
        return dims

    def decode(self, x: list) -> tuple[str, dict]:
        """(method, {param: value}) of a point; only the active method's params (+ common)."""
        entries = self.entries()
        if len(x) != len(entries):
            raise UserError(f"point has {len(x)} coordinates, the space has {len(entries)}",
                            field="space")
        method = str(x[0]) if self.multi else self.methods[0]
        values: dict = {}
        for v, (name, m, p) in zip(x, entries):
            if p is None or (m is not None and m != method):
                continue
            values[p.name] = p.from_x(v)
        values.update(self.fixed.get(method, {}))
        return method, get_adapter_class(method).Config.repair(values)

    def default_params(self, method: str) -> dict:
        """What ``adapt`` runs ``method`` with (``Adapter.default_hyperparameters``), restricted
        to this study's parameters of ``method`` plus ``lr``, with its pinned options."""
        d = get_adapter_class(method).default_hyperparameters()
        keys = set(self.params[method]) | {"lr"}
        return {**{k: d[k] for k in keys if k in d}, **self.fixed.get(method, {})}

    def encode(self, method: str, values: dict) -> list:
        """The point for ``method`` with ``values`` (missing/inactive params at their centre)."""
        if method not in self.methods:
            raise UserError(f"method {method!r} is not in this study ({', '.join(self.methods)})",
                            field="method")
        x: list = []
        for name, m, p in self.entries():
            if p is None:
                x.append(method)
            elif m is None or m == method:
                x.append(p.to_x(values.get(p.name)))
            else:
                x.append(p.to_x(None))
        return x

    def clean(self, x) -> list:
        """A point with numpy scalars turned into plain Python values (JSON-able)."""
        out = []
        for v, (_, _, p) in zip(x, self.entries()):
            if p is None or p.type == "categorical":
                out.append(str(v))
            elif p.type == "int":
                out.append(int(v))
            else:
                out.append(float(v))
        return out

    def random_points(self, n: int, seed: int) -> list[list]:
        from skopt.space import Space

        return [self.clean(x) for x in Space(self.dimensions()).rvs(n, random_state=seed)]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return {"methods": list(self.methods),
                "params": {m: {k: p.to_dict() for k, p in ps.items()}
                           for m, ps in self.params.items()},
                "common": {k: p.to_dict() for k, p in self.common.items()},
                "fixed": copy.deepcopy(self.fixed), "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSpace":
        mk = lambda k, s: Param(k, s["type"], s.get("low"), s.get("high"),  # noqa: E731
                                s.get("prior", "uniform"), s.get("choices"))
        return cls(methods=list(d["methods"]),
                   params={m: {k: mk(k, s) for k, s in ps.items()}
                           for m, ps in d["params"].items()},
                   common={k: mk(k, s) for k, s in d.get("common", {}).items()},
                   fixed=d.get("fixed", {}), source=d.get("source", "study"))

    def fix(self, method: str, options: dict) -> None:
        """Pin ``options`` of ``method`` (removing them from the search), e.g. from an init."""
        if method not in self.params:
            return
        for k in options:
            self.params[method].pop(k, None)
        self.fixed.setdefault(method, {}).update(options)


# ---------------------------------------------------------------------------- loading

def _line_map(text: str) -> dict[tuple, int]:
    """{key path: 1-based line} for every mapping key of a YAML document."""
    import yaml

    out: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value
                out[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                out[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return out
    if root is not None:
        walk(root, ())
    return out


def read_space_file(path: str | Path | None = None) -> tuple[dict, str, dict]:
    """(raw dict, source name, line map) of a search-space YAML (default: the packaged
    ``configs/search_spaces.yaml``, see ``metapeft.config``)."""
    from metapeft.config import config_file, read_yaml

    path = config_file(SPACE_FILE) if path is None else Path(path)
    raw = read_yaml(path, "search-space")
    return raw, str(path), _line_map(path.read_text(encoding="utf-8"))


def _known_options(method: str) -> set[str] | None:
    """The options of ``method``'s Config; None for an unknown method."""
    try:
        return set(get_adapter_class(method).Config.defaults())
    except UserError:
        return None


def parse_space(raw: Any, source: str = SPACE_FILE, lines: dict | None = None,
                check_options: bool = True) -> dict[str, dict[str, Param] | dict]:
    """Validate a raw search-space dict -> {"methods": {m: {k: Param}}, "common": {k: Param}}.

    Every problem is a one-line UserError naming the file, the line and the field.
    """
    lines = lines or {}

    def err(msg, path: tuple, fld: str | None = None):
        line = None
        for i in range(len(path), 0, -1):
            if path[:i] in lines:
                line = lines[path[:i]]
                break
        return UserError(msg, path=source, line=line, field=fld or ".".join(map(str, path)))

    if not isinstance(raw, dict):
        raise err("a search-space file must be a mapping with a 'methods' key", (), "methods")
    unknown = sorted(set(raw) - {"version", "common", "methods"})
    if unknown:
        raise err(f"unknown top-level key(s) {unknown}; expected version, common, methods",
                  (unknown[0],))
    methods = raw.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise err("'methods' must be a non-empty mapping of method: {param: spec}", ("methods",))

    def one(spec, path):
        name = str(path[-1])
        if isinstance(spec, list):  # shorthand: a list is a categorical
            spec = {"type": "categorical", "choices": spec}
        if not isinstance(spec, dict):
            raise err("a parameter must be a mapping like {type: real, low: 1e-4, high: 1e-1, "
                      "prior: log-uniform}", path)
        t = spec.get("type")
        if t not in TYPES:
            raise err(f"type must be one of {', '.join(TYPES)}, got {t!r}", path + ("type",))
        extra = sorted(set(spec) - ({"type", "choices"} if t == "categorical"
                                    else {"type", "low", "high", "prior"}))
        if extra:
            raise err(f"unexpected key(s) {extra} for a {t} parameter", path + (extra[0],))
        if t == "categorical":
            ch = spec.get("choices")
            if not isinstance(ch, list) or not ch:
                raise err("a categorical needs a non-empty 'choices' list", path + ("choices",))
            if len({json.dumps(c, sort_keys=True) for c in ch}) != len(ch):
                raise err("'choices' has duplicates", path + ("choices",))
            return Param(name, t, choices=list(ch))
        lo, hi = spec.get("low"), spec.get("high")
        for k, v in (("low", lo), ("high", hi)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise err(f"'{k}' must be a finite number, got {v!r}", path + (k,))
            if t == "int" and float(v) != int(v):
                raise err(f"'{k}' of an int parameter must be an integer, got {v!r}", path + (k,))
        if not lo < hi:
            raise err(f"'low' ({lo}) must be below 'high' ({hi})", path + ("low",))
        prior = spec.get("prior", "uniform")
        if prior not in PRIORS:
            raise err(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}",
                      path + ("prior",))
        if prior == "log-uniform" and lo <= 0:
            raise err(f"a log-uniform parameter needs low > 0, got {lo}", path + ("low",))
        if name == "lr" and lo <= 0:
            raise err(f"learning rates must be positive, got low={lo}", path + ("low",))
        if t == "int":
            lo, hi = int(lo), int(hi)
        return Param(name, t, lo, hi, prior)

    common_raw = raw.get("common") or {}
    if not isinstance(common_raw, dict):
        raise err("'common' must be a mapping of param: spec", ("common",))
    common = {}
    for k, spec in common_raw.items():
        if k not in COMMON_KEYS:
            raise err(f"unknown common parameter {k!r}; allowed: {', '.join(COMMON_KEYS)}",
                      ("common", k))
        common[k] = one(spec, ("common", k))
        if common[k].type != "int" or common[k].low < 1:
            raise err("steps must be an int parameter with low >= 1", ("common", k))
    out: dict = {}
    for m, ps in methods.items():
        if not isinstance(ps, dict) or not ps:
            raise err(f"method {m!r} needs a non-empty mapping of param: spec", ("methods", m))
        known = _known_options(m) if check_options else set()
        if known is None:
            raise err(f"unknown method {m!r}", ("methods", m))
        out[m] = {}
        for k, spec in ps.items():
            if check_options and k != "lr" and k not in known:
                raise err(f"{k!r} is not an option of {m} (valid: lr, "
                          f"{', '.join(sorted(known))})", ("methods", m, k))
            if k in COMMON_KEYS:
                raise err(f"{k!r} belongs under 'common:'", ("methods", m, k))
            out[m][str(k)] = one(spec, ("methods", m, k))
    return {"methods": out, "common": common}


def load_space(path: str | Path | None = None, methods: list[str] | str | None = None
               ) -> SearchSpace:
    """The study space for ``methods`` (None / "all": every method in the file)."""
    raw, source, lines = read_space_file(path)
    parsed = parse_space(raw, source, lines)
    available = list(parsed["methods"])
    if methods is None or methods == "all" or methods == ["all"]:
        chosen = available
    else:
        if isinstance(methods, str):
            methods = [m.strip() for m in methods.split(",") if m.strip()]
        chosen = []
        for m in methods:
            if m not in available:
                raise UserError(f"method {m!r} has no search space (available: "
                                f"{', '.join(available)})", path=source, field="methods")
            if m not in chosen:
                chosen.append(m)
        if not chosen:
            raise UserError("no methods chosen", field="methods")
    return SearchSpace(methods=chosen, params={m: dict(parsed["methods"][m]) for m in chosen},
                       common=dict(parsed["common"]), source=source)


def split_params(values: dict) -> tuple[dict, dict]:
    """({lr/steps}, adapter options) of a decoded point."""
    train = {k: v for k, v in values.items() if k in TRAIN_KEYS}
    opts = {k: v for k, v in values.items() if k not in TRAIN_KEYS}
    return train, opts
