"""Line plots as PNG bytes (matplotlib, no display), for TensorBoard images and the sweep."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def line_plot(series: dict[str, list[float]], title: str, xlabel: str, ylabel: str,
              logy: bool = False, x: list[float] | None = None,
              hline: tuple[str, float] | None = None) -> bytes:
    """One line per `series` entry (against `x`, default 0, 1, ...) → PNG bytes."""
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, values in series.items():
        axes.plot(x if x is not None else range(len(values)), values, label=name,
                  marker="o" if x is not None else None)
    if hline:
        axes.axhline(hline[1], color="gray", linestyle="--", label=hline[0])
    if logy:
        axes.set_yscale("log")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
