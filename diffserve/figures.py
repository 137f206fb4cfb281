"""Headless figures: pyplot without a display, and a PNG written atomically.

Every stage that draws (the cascade's curves, the planner's sweep, the benchmark's timelines)
uses these two, so no figure needs a display and no half-written PNG is left by a crash.
matplotlib is imported on first use only: the CLI starts without it.
"""

from __future__ import annotations

import io
from pathlib import Path

from diffserve.fileio import atomic_write_bytes


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path, *, dpi: int = 110, tight: bool = False) -> Path:
    """Write ``fig`` to ``path`` as a PNG atomically and close it. ``tight`` crops the margins
    (``bbox_inches="tight"``); otherwise the figure's own size is kept."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())
