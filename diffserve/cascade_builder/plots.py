"""A PNG of f(t) and Q(t) for every pair of a cascade file, for people to check at a glance."""

from __future__ import annotations

from pathlib import Path

from diffserve.figures import pyplot, save_png
from diffserve.schemas import CascadeFile


def plot_cascade(cascade: CascadeFile, path: str | Path) -> Path:
    plt = pyplot()
    fig, (ax_f, ax_q) = plt.subplots(1, 2, figsize=(11, 4.2))
    for pair in cascade.pairs:
        style = {"linewidth": 2.5 if pair.recommended else 1.2}
        label = pair.name + (" (recommended)" if pair.recommended else "")
        ax_f.plot(pair.grid, pair.f_t, label=label, **style)
        ax_q.plot(pair.grid, pair.q_t, label=label, **style)
    metric = cascade.pairs[0].metric
    ax_f.set(xlabel="threshold t", ylabel="f(t): fraction deferred to heavy", title="Deferral", ylim=(-0.02, 1.02))
    better = "lower is better" if metric == "fid" else "higher is better"
    ax_q.set(xlabel="threshold t", ylabel=f"Q(t): {metric.upper()} ({better})", title="Quality of the mixed output")
    for ax in (ax_f, ax_q):
        ax.grid(alpha=0.3)
    ax_q.legend(fontsize=8)
    if cascade.random_weights:
        fig.suptitle("RANDOM WEIGHTS: the pipeline ran, the quality numbers are meaningless", color="darkred")
    fig.tight_layout()
    return save_png(fig, path)
