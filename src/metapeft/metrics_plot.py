"""``evaluate --plot DIR``: the confusion matrix and the reliability diagram as PNGs, through
matplotlib (the optional ``plot`` extra; ``require_matplotlib`` says so in one line when it is
missing)."""

from __future__ import annotations

from pathlib import Path

from metapeft.errors import UserError

INSTALL_HINT = "pip install 'metapeft[plot]' (in a checkout: uv sync --extra plot)"


def require_matplotlib():
    """pyplot on the Agg backend, or a one-line UserError naming the ``plot`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(f"--plot needs matplotlib, the optional 'plot' extra: {INSTALL_HINT}",
                        field="plot") from None
    return plt


def plot_confusion(matrix: list[list[int]], labels: list[str], out: Path, title: str) -> Path:
    import numpy as np

    plt = require_matplotlib()
    m = np.asarray(matrix)
    C = len(labels)
    side = min(4 + 0.35 * C, 24)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(m, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if C <= 40:  # beyond that tick labels are unreadable; the JSON has the matrix
        ax.set_xticks(range(C), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(C), labels, fontsize=8)
    if C <= 15:
        for i in range(C):
            for j in range(C):
                if m[i, j]:
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_reliability(table: list[dict], ece: float, out: Path, title: str) -> Path:
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    width = table[0]["upper"] - table[0]["lower"]
    full = [r for r in table if r["count"]]
    centres = [r["lower"] + width / 2 for r in full]
    ax.bar([r["lower"] for r in full], [r["accuracy"] for r in full], width=width, align="edge",
           edgecolor="k", color="tab:blue", alpha=0.8, label="accuracy")
    ax.vlines(centres, [r["accuracy"] for r in full], [r["confidence"] for r in full],
              colors="tab:red", lw=2)
    ax.scatter(centres, [r["confidence"] for r in full], c="tab:red", zorder=3,
               label="mean confidence")
    for x, r in zip(centres, full):  # examples per bin, above its bar
        ax.annotate(f"n={r['count']}", (x, min(r["accuracy"], 0.94) + 0.01), ha="center",
                    va="bottom", fontsize=7, color="0.25")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"confidence ({len(table)} equal-width bins)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {ece:.3f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_evaluation(metrics: dict, out_dir: str | Path, title: str) -> dict[str, Path]:
    """Write ``confusion_matrix.png`` and ``reliability.png`` into ``out_dir`` (created)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError("exists and is not a directory", path=str(out_dir), field="plot")
    out_dir.mkdir(parents=True, exist_ok=True)
    conf = metrics["confusion"]
    return {"confusion_matrix": plot_confusion(conf["matrix"], conf["labels"],
                                               out_dir / "confusion_matrix.png", title),
            "reliability": plot_reliability(metrics["reliability"], metrics["ece"],
                                            out_dir / "reliability.png", title)}
