"""blockrag's evaluation: NQ-open questions answered in several prefill modes over the same passages, scored.

    config = EvalConfig("qa.jsonl.gz", index="nq-index", modes=tuple(parse_modes("full,prefix")), limit=300)
    report = run_evaluation(config)          # settings, per mode accuracy and costs, paired tests, a table

Modules: ``qa`` (the data, its scoring and the task's prompt defaults), ``modes`` (mode specs),
``questions`` (each question's passages), ``stats`` (intervals, paired test), ``results`` (the
resumable results file), ``report`` (summary, Markdown, two runs paired), ``trained`` (the guard against scoring
an adapter's training rows), ``run`` (the engine reader and the run). ``blockrag eval`` is its command.
"""

from blockrag.errors import EvaluationError, TrainedRowsError

from .modes import DEFAULT_MODES, EvalMode, parse_mode, parse_modes
from .qa import (DEFAULT_SYSTEM_PROMPT, DEFAULT_TOP_K, QAItem, best_subspan_match, first_line, load_qa,
                 normalize_answer, oracle_plus_random, qa_documents, retrieved_nodes, retrieved_passages)
from .questions import EvalQuestion, oracle_questions, retrieved_questions
from .report import compare_runs, comparison_table, markdown_table, summarize
from .results import RESUME_KEYS, ResultsFile, answer_record, read_results
from .run import DEFAULT_MAX_NEW_TOKENS, EngineReader, EvalConfig, Reader, evaluate, run_evaluation
from .stats import mcnemar_exact, wilson_interval
from .trained import check_untrained, longest_untrained_run

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_MODES", "DEFAULT_SYSTEM_PROMPT", "DEFAULT_TOP_K", "RESUME_KEYS", "EngineReader",
    "EvalConfig", "EvalMode", "EvalQuestion", "EvaluationError", "QAItem", "Reader", "ResultsFile",
    "TrainedRowsError", "answer_record", "best_subspan_match", "check_untrained", "compare_runs", "comparison_table",
    "evaluate", "first_line",
    "load_qa", "longest_untrained_run", "markdown_table", "mcnemar_exact", "normalize_answer", "oracle_plus_random",
    "oracle_questions", "parse_mode", "parse_modes", "qa_documents", "retrieved_nodes", "retrieved_passages",
    "read_results", "retrieved_questions", "run_evaluation", "summarize", "wilson_interval",
]
