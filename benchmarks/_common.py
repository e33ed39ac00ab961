"""Shared helpers for the benchmark scripts (not tests): paths, CIs, markdown tables."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

import metapeft  # noqa: F401  (OpenBLAS preload before mlx)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
SMOL = SHARED / "models" / "SmolLM2-135M-Instruct"  # the headline model (MLX 4-bit on disk)
CLINC = SHARED / "data" / "clinc150"
HELD_OUT_DOMAINS = ["banking", "travel"]


def real_model_run(ap, **extra):
    """Parse ``ap`` plus the common --model/--seed/--json options of the SmolLM2 benchmarks, check
    that the model and CLINC150 are there, and return (args, the loaded base model, a 5-way 5-shot
    episode source over the meta-train domains' train split, 10 query examples per class)."""
    ap.add_argument("--model", default=str(SMOL))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    require(Path(args.model), "the model")
    require(CLINC, "CLINC150")
    from metapeft.data.episodes import EpisodeSource
    from metapeft.models import load_base_model

    source = EpisodeSource(clinc_pool("train", exclude=HELD_OUT_DOMAINS), ways=5, shots=5,
                           query=10, name="clinc-train-meta-train-domains")
    return args, load_base_model(args.model), source


def bad_input(message: str):
    """A benchmark's bad input, as the CLI reports it: one line on stderr, exit status 2."""
    print(message, file=sys.stderr)
    sys.exit(2)


def require(path: Path, what: str) -> Path:
    if not path.exists():
        bad_input(f"{what} not found at {path}; benchmarks need ../shared")
    return path


def mean_ci(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return (float(v.mean()) if v.size else float("nan")), float("nan")
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(v.size))


def fmt(values, pct: bool = True) -> str:
    m, c = mean_ci(values)
    return f"{100 * m:.1f} ± {100 * c:.1f}" if pct else f"{m:.3g} ± {c:.2g}"


def clinc_pool(split: str = "train", domains=None, exclude=None, root: Path = CLINC):
    """A split's rows, filtered by domain; ``root`` holds ``<split>.jsonl`` (CLINC150 by default,
    or another corpus in its layout, e.g. benchmarks/wordnet_tasks.py's)."""
    from metapeft.data.pools import filter_pool
    from metapeft.data.tasks import read_rows

    pool = read_rows(require(Path(root) / f"{split}.jsonl", "the task data"))
    return filter_pool(pool, domains=domains, exclude_domains=exclude)


def meta_split(setup: str):
    """``(ways, shots, sources, test_src)`` of a meta-learning benchmark split, with the meta-test
    classes checked disjoint from every meta-train and validation class. ``clinc``: CLINC150's
    train split minus banking and travel (15% of its intents for validation), meta-test 5-way
    5-shot episodes (10 query per class) of the banking + travel *test* split. ``topic``: the
    quickstart's split of the synthetic ``topic`` family, meta-train on 18 of its 24 topics (20%
    of them for validation), meta-test 4-way 4-shot (8 query per class) on the 6 never seen."""
    from metapeft import api
    from metapeft.data.episodes import EpisodeSource

    if setup == "clinc":
        require(CLINC, "CLINC150")
        sources = api.build_meta_sources(str(CLINC / "train.jsonl"),
                                         exclude_domains=HELD_OUT_DOMAINS, ways=5, shots=5,
                                         query=5, val_fraction=0.15, seed=0)
        test_src = EpisodeSource(clinc_pool("test", domains=HELD_OUT_DOMAINS), ways=5, shots=5,
                                 query=10, name="CLINC150 test split, banking + travel")
        ways, shots = 5, 5
    else:
        from metapeft.data.synthetic import family_labels, generate_pool

        held_out = family_labels("topic")[::4]
        sources = api.build_meta_sources("synthetic", domains=["topic"], exclude_labels=held_out,
                                         ways=4, shots=4, query=4, val_fraction=0.2)
        test_src = EpisodeSource(generate_pool("topic", seed=1, per_label=40), held_out, ways=4,
                                 shots=4, query=8, name="6 held-out synthetic topics")
        ways, shots = 4, 4
    assert not set(sources.spec["train_classes"]) & set(test_src.classes)
    assert not set(sources.spec["val_classes"]) & set(test_src.classes)
    return ways, shots, sources, test_src


def write_json(path: str | None, obj) -> None:
    if path:
        from metapeft.artifacts import atomic_write_json

        atomic_write_json(path, obj)


def nearest_class_mean_accuracy(base, data) -> float:
    """The training-free baseline: the library's ``prototype`` method (the cosine nearest class
    mean of the frozen model's mean-pooled final hidden states) fitted on the support set and
    scored on the query set, uncentred (``center: false``) as the README's tables measured it."""
    from metapeft.adapters import get_adapter_class
    from metapeft.train import evaluate

    adapter = get_adapter_class("prototype").attach(base, {"center": False})
    return evaluate(adapter, adapter.fit(adapter.init_params(), data.support), data.query)[0]
