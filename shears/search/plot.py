"""front.png: quality against size for every evaluation, the Pareto front highlighted as a staircase,
and the maximal / heuristic / minimal subnets labelled."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_file
from .history import History


def plot_front(history: History, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    quality = next(o for o in history.objectives if not o.is_size)
    size = next(o for o in history.objectives if o.is_size)
    xs = [r["objectives"][size.name] for r in history.full_records()]
    ys = [r["objectives"][quality.name] for r in history.full_records()]
    front = sorted(history.front(), key=lambda r: r["objectives"][size.name])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter(xs, ys, s=14, c="0.65", label=f"evaluated ({len(xs)})")
    fx = [r["objectives"][size.name] for r in front]
    fy = [r["objectives"][quality.name] for r in front]
    ax.step(fx, fy, where="post", c="tab:red", lw=1.2)
    ax.scatter(fx, fy, s=26, c="tab:red", zorder=3, label=f"Pareto front ({len(front)})")
    for r in history.full_records():
        if r.get("label"):
            ax.annotate(r["label"], (r["objectives"][size.name], r["objectives"][quality.name]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(size.name.replace("_", " "))
    ax.set_ylabel(f"validation {quality.name}")
    ax.set_title(f"{len(xs)} subnets, hypervolume {history.hypervolume():.4f}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return path
