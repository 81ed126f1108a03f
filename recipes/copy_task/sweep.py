"""Train every (cell, delay) pair and tabulate: `sweep(config, workdir, delays, cells)`.

Each pair trains in `workdir/<cell>_T<delay>/` with the config (plus the pair's
cell and delay); a pair whose `metrics.json` exists is not retrained, so a
killed sweep continues where it stopped. Writes `results.csv`, `results.md`,
`results.png` and `accuracy.png` (held-out loss / baseline and copied-symbol accuracy against the
delay, per cell) and `gradient_flow.png` (‖∂loss/∂h_t‖ over t at the longest
delay, per cell).
"""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Any

import keras
from absl import logging

from recipes.common import errors, workdirs
from recipes.copy_task import plots, train

CELLS = {"lstm": ("lstm", False), "rnn": ("rnn", False), "gru": ("gru", False),
         "lstm_chrono": ("lstm", True), "lstm_peephole": ("lstm_peephole", False),
         "lstm_ln": ("lstm_ln", False)}
COLUMNS = ["cell", "delay", "eval_loss", "baseline", "loss_over_baseline", "copied_accuracy",
           "steps", "train_minutes", "seconds_per_step"]


def _parse(delays: list[str], cells: list[str]) -> tuple[list[int], list[str]]:
    try:
        parsed = [int(d) for d in delays]
    except ValueError:
        raise errors.RecipeError(f"--delays={','.join(delays)} must be integers") from None
    if not parsed or min(parsed) <= 0:
        raise errors.RecipeError(f"--delays={','.join(delays)} must be positive integers")
    unknown = [c for c in cells if c not in CELLS]
    if unknown or not cells:
        raise errors.RecipeError(f"unknown cell {unknown[0] if unknown else ''!r} in --cells "
                                 f"(known: {', '.join(CELLS)})")
    return parsed, cells


def sweep(config: Any, workdir: str, delays: list[str], cells: list[str]) -> list[dict]:
    """Trains the pairs (cells outer, delays inner) and writes the table and plots."""
    delays_, cells = _parse(delays, cells)
    root = workdirs.prepare_workdir(workdir)
    rows, flows = [], {}
    for name in cells:
        for delay in delays_:
            run = root / f"{name}_T{delay}"
            if not (run / "metrics.json").exists():
                pair = config.copy_and_resolve_references()
                with pair.unlocked():
                    pair.cell, pair.chrono = CELLS[name]
                    pair.delay = delay
                logging.info("sweep: training %s at delay %d in %s", name, delay, run)
                keras.backend.clear_session()
                train.train_and_evaluate(pair, str(run))
            metrics = json.loads((run / "metrics.json").read_text())
            rows.append({
                "cell": name, "delay": delay,
                "eval_loss": round(metrics["eval"]["loss"], 4),
                "baseline": round(metrics["eval"]["baseline"], 4),
                "loss_over_baseline": round(metrics["eval"]["loss_over_baseline"], 3),
                "copied_accuracy": round(metrics["eval"]["copied_accuracy"], 4),
                "steps": metrics["steps"],
                "train_minutes": round(metrics["train_seconds"] / 60, 1),
                "seconds_per_step": metrics["seconds_per_step"],
            })
            if delay == max(delays_):
                flows[name] = json.loads((run / "diagnostics.json").read_text())["gradient_flow"]
    _write_tables(root, rows)
    _write_plots(root, rows, flows, cells, max(delays_))
    return rows


def _write_tables(root: pathlib.Path, rows: list[dict]) -> None:
    with open(root / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    (root / "results.md").write_text("\n".join(lines) + "\n")


def _write_plots(root: pathlib.Path, rows: list[dict], flows: dict[str, list[float]],
                 cells: list[str], longest: int) -> None:
    def by_cell(column: str) -> dict[str, list[float]]:
        return {f"{cell} ({_step_ms(rows, cell)} ms/step)": [r[column] for r in rows
                                                            if r["cell"] == cell]
                for cell in cells}

    delays = sorted({r["delay"] for r in rows})
    (root / "results.png").write_bytes(plots.line_plot(
        by_cell("loss_over_baseline"), "held-out loss / memoryless baseline (1 = no memory)",
        "delay T", "loss / baseline", x=delays, hline=("baseline", 1.0)))
    (root / "accuracy.png").write_bytes(plots.line_plot(
        by_cell("copied_accuracy"), "copied-symbol accuracy (chance = 1/num_symbols)",
        "delay T", "accuracy", x=delays))
    (root / "gradient_flow.png").write_bytes(plots.line_plot(
        flows, f"error signal reaching step t (T={longest}, trained model)", "time step t",
        "‖∂loss/∂h_t‖", logy=True))


def _step_ms(rows: list[dict], cell: str) -> str:
    times = [r["seconds_per_step"] for r in rows if r["cell"] == cell and r["seconds_per_step"]]
    return f"{1000 * sum(times) / len(times):.0f}" if times else "?"
