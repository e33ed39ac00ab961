"""A study as a picture: the accuracy/seconds front and the best accuracy so far (matplotlib,
the optional ``plot`` extra)."""

from __future__ import annotations

import math
from pathlib import Path

from metapeft.tune.study import Study, as_float


def plot_study(study: Study, out: str | Path) -> Path | None:
    """PNG: the accuracy/seconds front and best accuracy so far against trials; None when
    matplotlib (the ``plot`` extra) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = study.measured()
    front = set(study.pareto())
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [study.trials[i]["seconds"] for i in ok]
    ys = [study.trials[i]["accuracy"] for i in ok]
    a1.scatter(xs, ys, c="lightgray", label="trials")
    fr = sorted(front, key=lambda i: study.trials[i]["seconds"])
    a1.plot([study.trials[i]["seconds"] for i in fr], [study.trials[i]["accuracy"] for i in fr],
            "o-", c="tab:red", label="Pareto front")
    rec = study.recommended()
    if rec is not None:
        a1.scatter([study.trials[rec]["seconds"]], [study.trials[rec]["accuracy"]], s=160,
                   marker="*", c="gold", edgecolors="k", zorder=5, label="recommended")
    a1.set_xlabel("training seconds")
    a1.set_ylabel("query accuracy")
    a1.legend()
    best, curve = -math.inf, []
    for t in study.trials:
        if t.get("status") == "ok":
            best = max(best, as_float(t.get("accuracy")))
        curve.append(best if math.isfinite(best) else math.nan)
    a2.plot(range(1, len(curve) + 1), curve, "o-")
    a2.set_xlabel("trial")
    a2.set_ylabel("best accuracy so far")
    fig.suptitle(f"study {study.name}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
