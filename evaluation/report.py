"""What an evaluation reports: per mode accuracy and costs, every mode paired with the first, and a Markdown table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .modes import EvalMode
from .questions import EvalQuestion
from .stats import mcnemar_exact, wilson_interval


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize(questions: Sequence[EvalQuestion], modes: Sequence[EvalMode],
              done: dict[tuple[int, str], dict[str, Any]]) -> dict[str, Any]:
    """Per mode accuracy with its Wilson 95% interval and mean costs; every mode paired against the first."""
    per_mode: dict[str, Any] = {}
    for mode in modes:
        rows = [done[q.item.index, mode.name] for q in questions if (q.item.index, mode.name) in done]
        correct = sum(r["correct"] for r in rows)
        low, high = wilson_interval(correct, len(rows))
        per_mode[mode.name] = {
            "n": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else None,
            "ci95": [low, high],
            "mean_prompt_tokens": _mean([r["prompt_tokens"] for r in rows]),
            "mean_block_tokens": _mean([r["block_tokens"] for r in rows]),
            "mean_ttft_s": _mean([r["ttft_s"] for r in rows]),
            "mean_answer_tokens": _mean([r["answer_tokens"] for r in rows]),
        }
    first = modes[0].name
    paired: dict[str, Any] = {}
    for mode in modes[1:]:
        pairs = [(done[q.item.index, first]["correct"], done[q.item.index, mode.name]["correct"])
                 for q in questions if (q.item.index, first) in done and (q.item.index, mode.name) in done]
        b = sum(1 for x, y in pairs if x and not y)
        c = sum(1 for x, y in pairs if y and not x)
        paired[mode.name] = {"against": first, "n": len(pairs), "b": b, "c": c, "p_value": mcnemar_exact(b, c),
                             "accuracy_difference": (c - b) / len(pairs) if pairs else None}
    ranks = [q.gold_rank for q in questions]
    return {"recall": sum(r is not None for r in ranks) / len(ranks) if ranks else None,
            "modes": per_mode, "paired": paired}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown_table(summary: dict[str, Any], settings: dict[str, Any]) -> str:
    """The summary as a table for benchmarks/RESULTS.md, with a line saying what it was measured on."""
    lines = ["| mode | n | accuracy | 95% CI | Δ vs first | b / c | McNemar p | prompt tokens | block tokens | "
             "TTFT (ms) | answer tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in summary["modes"].items():
        pair = summary["paired"].get(name)
        diff = "" if pair is None or pair["accuracy_difference"] is None else \
            f"{100 * pair['accuracy_difference']:+.1f} pts"
        bc = "" if pair is None else f"{pair['b']} / {pair['c']}"
        p = "" if pair is None else f"{pair['p_value']:.3g}"
        ttft = "n/a" if m["mean_ttft_s"] is None else f"{1000 * m['mean_ttft_s']:.1f}"
        tokens = [("n/a" if m[k] is None else f"{m[k]:.1f}")
                  for k in ("mean_prompt_tokens", "mean_block_tokens", "mean_answer_tokens")]
        lines.append(f"| {name} | {m['n']} | {_pct(m['accuracy'])} | {_pct(m['ci95'][0])}–{_pct(m['ci95'][1])} | "
                     f"{diff} | {bc} | {p} | {tokens[0]} | {tokens[1]} | {ttft} | {tokens[2]} |")
    if settings["passages"] == "retrieved":
        source = f"top-{settings['top_k']} of {settings['index_passages']} passages (recall@{settings['top_k']} " \
                 f"{_pct(summary['recall'])}), {settings['passage_order']}"
    else:
        where = "a random position" if settings["gold_position"] is None else f"position {settings['gold_position']}"
        source = f"gold passage at {where} among {settings['oracle_plus_random']}"
    lines.append("")
    lines.append(f"{settings['questions']} questions (lines {settings['start']}–"
                 f"{settings['start'] + settings['questions'] - 1} of {Path(settings['data']).name}), {source}; "
                 f"greedy, {settings['max_new_tokens']} new tokens at most; b / c: questions only the first mode / "
                 "only this mode answered correctly.")
    return "\n".join(lines)
