"""Figures for reports: matplotlib (the optional ``plot`` extra) on the Agg backend, written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .io import atomic_write_bytes


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None when the ``plot`` extra is missing."""
    try:
        import matplotlib  # optional dependency
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt: Any, fig: Any, path: Path) -> None:
    """Write a figure as PNG atomically and close it."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
