"""What an evaluation reports: per mode accuracy and costs, every mode paired with the first, and a Markdown table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .modes import EvalMode
from .questions import EvalQuestion
from .stats import discordant, mcnemar_exact, wilson_interval


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
        b, c = discordant(pairs)
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


def compare_runs(first: tuple[dict[str, Any], dict[tuple[int, str], dict[str, Any]]],
                 second: tuple[dict[str, Any], dict[tuple[int, str], dict[str, Any]]]) -> dict[str, Any]:
    """Two runs' answers (settings and answers, as :func:`~.results.read_results` returns them) paired by question,
    for every mode both answered: each run's accuracy, b (only the first right), c (only the second right) and the
    exact McNemar p-value. ``same_passages`` counts the pairs whose prompts held the same passages in the same order;
    ``settings_differ`` names the settings the two runs did not share."""
    (settings_a, done_a), (settings_b, done_b) = first, second
    answered_b = {mode for _, mode in done_b}
    rows = []
    for mode in [m for m in dict.fromkeys(mode for _, mode in done_a) if m in answered_b]:
        pairs = [(done_a[key], done_b[key]) for key in done_a if key[1] == mode and key in done_b]
        b, c = discordant((x["correct"], y["correct"]) for x, y in pairs)
        rows.append({"mode": mode, "n": len(pairs),
                     "same_passages": sum(1 for x, y in pairs if x["passages"] == y["passages"]),
                     "first_accuracy": sum(x["correct"] for x, _ in pairs) / len(pairs),
                     "second_accuracy": sum(y["correct"] for _, y in pairs) / len(pairs),
                     "b": b, "c": c, "p_value": mcnemar_exact(b, c)})
    differ = sorted(k for k in {*settings_a, *settings_b} if settings_a.get(k) != settings_b.get(k))
    return {"settings_differ": {k: [settings_a.get(k), settings_b.get(k)] for k in differ}, "rows": rows}


def comparison_table(comparison: dict[str, Any]) -> str:
    """:func:`compare_runs`'s result as a Markdown table."""
    lines = ["| mode | n | same passages | first | second | b / c | McNemar p |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in comparison["rows"]:
        lines.append(f"| {r['mode']} | {r['n']} | {r['same_passages']} | {_pct(r['first_accuracy'])} | "
                     f"{_pct(r['second_accuracy'])} | {r['b']} / {r['c']} | {r['p_value']:.3g} |")
    differ = ", ".join(f"{k} {a!r} / {b!r}" for k, (a, b) in comparison["settings_differ"].items())
    lines += ["", f"b / c: questions only the first run / only the second answered correctly. Settings that differ: "
              f"{differ or 'none'}."]
    return "\n".join(lines)
