"""``blockrag eval``: NQ-open data, the scoring rule, the statistics, resuming, oracle passages, and one real run."""

from __future__ import annotations

import gzip
import json
import re
import random
from pathlib import Path

import pytest

from blockrag.cli import main as cli_main
from blockrag.engine import DEFAULT_MODEL, BlockEngine, GenerationResult, Recovery, StoredPassage, load_model
from blockrag.engine.adapter import ADAPTER_SETTINGS, TrainingRows, adapter_training_rows, file_sha256
from blockrag.errors import EvaluationError, TrainedRowsError
from blockrag.kvstore import open_store
from blockrag.evaluation.modes import EvalMode, parse_mode, parse_modes
from blockrag.evaluation.qa import QAItem, best_subspan_match, first_line, load_qa, oracle_plus_random, qa_documents
from blockrag.evaluation.questions import EvalQuestion, oracle_questions, retrieved_questions
from blockrag.evaluation.report import markdown_table, summarize
from blockrag.evaluation.results import ResultsFile
from blockrag.evaluation.run import EngineReader, evaluate
from blockrag.evaluation.stats import mcnemar_exact, wilson_interval
from blockrag.evaluation.trained import check_untrained, longest_untrained_run
from blockrag.retriever import DocumentFormatError, Node, ScoredNode, answer, ingest
from tiny_models import tiny_model

NQ = Path(__file__).resolve().parents[2] / "shared" / "data" / "nq-open-dev.jsonl.gz"
needs_nq = pytest.mark.skipif(not NQ.is_file(), reason=f"{NQ} is absent (project data, not shipped to users; "
                              "see ../shared/data/README.md)")


def write_qa(path: Path, rows: list[tuple[str, list[str], str, str]]) -> Path:
    """An NQ-open file of (question, answers, title, passage text) rows."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for question, answers, title, text in rows:
            f.write(json.dumps({"question": question, "answers": answers,
                                "ctxs": [{"title": title, "text": text, "hasanswer": True, "isgold": True}]}) + "\n")
    return path


def item(i: int, gold: str | None = None) -> QAItem:
    return QAItem(i, f"question {i}?", (f"answer {i}",), f"nq-{i}", gold or f"Page {i}\n\npassage {i}")


# --- scoring --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, answers, expected", [
    ("Wilhelm Conrad Röntgen", ["Wilhelm Conrad Röntgen"], True),
    ("The first Nobel Prize in Physics was awarded in 1901 to Wilhelm Conrad Röntgen, of Germany",
     ["Wilhelm Conrad Röntgen"], True),
    ("John Bardeen", ["Wilhelm Conrad Röntgen"], False),
    ("It will be released on May 18 2018.", ["May 18, 2018"], True),  # punctuation dropped on both sides
    ("the U.S.A.", ["USA"], True),
    ("They were called Beatles", ["The Beatles"], True),  # articles dropped
    ("WASHINGTON,   D.C.", ["Washington D.C."], True),  # case and whitespace
    ("in 1990", ["1"], True),  # a plain substring test, as in the paper
    ("Richard Nixon", ["Gerald Ford", "Nixon"], True),  # any of the answers
    ("", ["Paris"], False),
    ("the Handbook and a man", ["handbook and man"], True),  # "an" inside "and" is kept, the word "a" is not
])
def test_best_subspan_match_follows_lost_in_the_middle(prediction, answers, expected):
    assert best_subspan_match(prediction, answers) is expected


def test_only_the_first_line_is_scored():
    assert first_line("  Paris \nThe documents also mention Lyon.") == "Paris"
    assert not best_subspan_match(first_line("I do not know.\nParis is the capital."), ["Paris"])


# --- statistics ------------------------------------------------------------------------------------------------

# Wilson intervals and exact binomial p-values as computed by scipy.stats.binomtest (1.16).
@pytest.mark.parametrize("k, n, low, high", [
    (7, 10, 0.39677814746114526, 0.892208732593699),
    (81, 263, 0.2552885198782742, 0.36620957698280004),
    (54, 300, 0.14065830269666493, 0.22743319888704452),
    (0, 20, 0.0, 0.16112515805281935),
    (300, 300, 0.9873570287754541, 1.0),
])
def test_wilson_interval_matches_known_values(k, n, low, high):
    assert wilson_interval(k, n) == pytest.approx((low, high), abs=1e-12)


@pytest.mark.parametrize("b, c, p", [
    (1, 6, 0.125), (0, 5, 0.0625), (10, 22, 0.050102459732443094), (40, 61, 0.046044066929342785),
    (61, 40, 0.046044066929342785), (13, 13, 1.0), (3, 0, 0.25), (0, 0, 1.0),
])
def test_mcnemar_exact_matches_the_binomial_test(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


# --- modes -----------------------------------------------------------------------------------------------------


def test_modes_parse_with_recovery_options():
    modes = parse_modes("full, block,naive,prefix+recompute=0.15+check=1,prefix+sink=4")
    assert modes == [
        EvalMode("full", "full"), EvalMode("block", "block"), EvalMode("naive", "block", "naive"),
        EvalMode("prefix+recompute=0.15+check=1", "block", "prefix", Recovery(recompute=0.15, check_layer=1)),
        EvalMode("prefix+sink=4", "block", "prefix", Recovery(sink_tokens=4)),
    ]
    assert parse_mode("block+recompute=0.1+check=2+sink=3").recovery == Recovery(0.1, 2, 3)


@pytest.mark.parametrize("spec, message", [
    ("fast", "unknown mode"), ("full+recompute=0.1", "nothing to recover"), ("prefix+recompute", "cannot read"),
    ("prefix+speed=2", "cannot read"), ("prefix+recompute=lots", "fraction"), ("prefix+sink=1.5", "whole number"),
    ("prefix+sink=1+sink=2", "twice"), ("prefix+recompute=1.5", "recompute"), ("naive+check=0", "check_layer"),
])
def test_bad_modes_say_what_is_wrong(spec, message):
    with pytest.raises(EvaluationError, match=message):
        parse_mode(spec)


def test_modes_are_listed_once():
    with pytest.raises(EvaluationError, match="twice"):
        parse_modes("full,prefix,full")
    with pytest.raises(EvaluationError, match="no modes"):
        parse_modes(" , ")


# --- data -------------------------------------------------------------------------------------------------------


def test_load_qa_and_its_corpus(tmp_path):
    path = write_qa(tmp_path / "qa.jsonl.gz", [("q0?", ["a0"], "T0", "text 0"), ("q1?", ["a1", "b1"], "T1", "text 1"),
                                               ("q2?", ["a2"], "T2", "text 2")])
    docs = qa_documents(path)
    assert [(d.id, d.text, d.metadata) for d in docs] == [(f"nq-{i}", f"T{i}\n\ntext {i}", {"title": f"T{i}"})
                                                          for i in range(3)]
    items = load_qa(path, limit=1, start=1)
    assert items == [QAItem(1, "q1?", ("a1", "b1"), "nq-1", "T1\n\ntext 1")]
    assert [i.gold for i in load_qa(path)] == [d.text for d in docs]
    (tmp_path / "bad.jsonl").write_text('{"question": "q?", "answers": []}\n')
    with pytest.raises(DocumentFormatError, match="bad.jsonl:1 is not an NQ-open question"):
        load_qa(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="nq-open"):
        load_qa(tmp_path / "missing.jsonl.gz")


@needs_nq
def test_the_shared_dev_file_reads_as_a_corpus_of_its_gold_passages():
    items, docs = load_qa(NQ), qa_documents(NQ)
    assert len(items) == len(docs) == 1000
    assert all(i.gold == d.text and i.gold_id == d.id for i, d in zip(items, docs))
    assert items[0].answers == ("Wilhelm Conrad Röntgen",)
    # Scored against its own passage, nearly every question finds an answer in it (the passages are gold).
    assert sum(best_subspan_match(i.gold, i.answers) for i in items) >= 950


# --- oracle passages --------------------------------------------------------------------------------------------


def test_oracle_plus_random_places_the_gold_passage_among_distinct_others():
    items = [item(i) for i in range(20)] + [item(20, gold=item(3).gold)]  # question 20 shares question 3's passage
    for position in range(5):
        passages = oracle_plus_random(items, items[3], 5, position, random.Random(7))
        assert passages[position] == items[3].gold
        others = passages[:position] + passages[position + 1:]
        assert len(set(others)) == 4 and items[3].gold not in others
    again = [oracle_plus_random(items, items[3], 5, 2, random.Random(7)) for _ in range(2)]
    assert again[0] == again[1]
    assert oracle_plus_random(items, items[3], 5, 2, random.Random(8)) != again[0]
    with pytest.raises(ValueError, match="gold position"):
        oracle_plus_random(items, items[3], 5, 5, random.Random(0))
    with pytest.raises(ValueError, match="distractors"):
        oracle_plus_random(items, items[3], 21, 0, random.Random(0))  # 19 other distinct passages only


def test_oracle_questions_are_seeded_per_question():
    corpus = [item(i) for i in range(30)]
    whole = oracle_questions(corpus, corpus, 4, None, seed=1)
    assert oracle_questions(corpus[5:9], corpus, 4, None, seed=1) == whole[5:9]  # any subset: the same passages
    assert oracle_questions(corpus, corpus, 4, None, seed=2) != whole
    assert len({q.gold_rank for q in whole}) > 1  # the gold position varies when not fixed
    for q in whole + oracle_questions(corpus, corpus, 4, 3, seed=1)[:5]:
        assert q.passages[q.gold_rank] == q.item.gold and q.passage_ids[q.gold_rank] == q.item.gold_id
        assert [corpus[int(i.removeprefix("nq-"))].gold for i in q.passage_ids] == list(q.passages)
    assert {q.gold_rank for q in oracle_questions(corpus, corpus, 4, 3, seed=1)} == {3}


# --- placing retrieved passages ---------------------------------------------------------------------------------


class RankedIndex:
    """Retrieval that ranks the nodes ``n0, n1, ...`` in that order, whatever the question."""

    def __init__(self, n: int):
        self.index = self
        self._nodes = {f"n{i}": Node(f"n{i}", f"doc{i}", 0, f"Passage {i}.", 3, f"key{i}") for i in range(n)}

    def retrieve(self, question, top_k):
        return [ScoredNode(node, 1.0 - k / 10) for k, node in enumerate(list(self._nodes.values())[:top_k])]

    def nodes(self, ids):
        return [self._nodes[i] for i in ids]


class PassageRecorder:
    """An engine stand-in that keeps the passages it was asked to answer over."""

    passage_order = "best-last"

    def generate(self, prefix, passages, question, **kwargs):
        self.passages = passages
        return GenerationResult("ok", [1], "stop", 10, 0, 10, 0.01, 0.01)


def test_retrieved_passages_are_placed_best_last_by_default():
    retriever, items = RankedIndex(3), [QAItem(0, "q?", ("x",), "doc0", "Passage 0.")]
    (question,) = retrieved_questions(items, retriever, 3)
    assert question.passages == ("Passage 2.", "Passage 1.", "Passage 0.") and question.gold_rank == 2
    (question,) = retrieved_questions(items, retriever, 3, "best-first")
    assert question.passage_ids == ("doc0", "doc1", "doc2") and question.gold_rank == 0
    with pytest.raises(ValueError, match="order must be one of"):
        retrieved_questions(items, retriever, 3, "best-middle")
    engine = PassageRecorder()
    answered = answer(retriever, engine, "q?", top_k=2)
    # the prompt: best last, next to the question, each with the store key of its block
    assert engine.passages == [StoredPassage("Passage 1.", "key1"), StoredPassage("Passage 0.", "key0")]
    assert [hit.id for hit in answered.passages] == ["n0", "n1"]  # the answer lists them best first
    answer(retriever, engine, "q?", top_k=2, order="best-first")
    assert [p.text for p in engine.passages] == ["Passage 0.", "Passage 1."]
    engine.passage_order = "best-first"  # a model fine-tuned best first reads them in its own order
    answer(retriever, engine, "q?", top_k=2)
    assert [p.text for p in engine.passages] == ["Passage 0.", "Passage 1."]


# --- answering from the store -------------------------------------------------------------------------------------


def test_the_reader_reads_each_block_once_per_answer(tiny_engine, tmp_path, monkeypatch):
    """Blocks are stored before the clock starts the first time a passage is needed; after that, the timed
    generation is the only lookup of a question's blocks."""
    store = open_store(tmp_path / "kv", fingerprint=tiny_engine.fingerprint)
    engine = BlockEngine(tiny_engine.loaded, store=store)
    looked_up: list[str] = []
    get_many = store.get_many
    monkeypatch.setattr(store, "get_many", lambda keys: looked_up.extend(keys) or get_many(keys))
    reader, mode = EngineReader(engine, max_new_tokens=2), parse_mode("prefix")
    passages = ["The Vardel lighthouse is painted red.", "Ostrel was founded by Mira Kolb."]
    keys = engine.block_keys(passages, block_mode="prefix")
    first = reader.answer("What colour is the lighthouse?", passages, mode)
    assert looked_up == keys + keys and all(key in store for key in keys)  # a miss, encoded and stored; then read
    looked_up.clear()
    again = reader.answer("What colour is the lighthouse?", passages, mode)
    assert looked_up == keys and again.text == first.text and again.block_tokens == first.block_tokens
    looked_up.clear()
    fresh = EngineReader(engine, max_new_tokens=2)  # a stored block is not stored again: the store is asked first
    assert fresh.answer("What colour is the lighthouse?", passages[::-1], mode).block_tokens == first.block_tokens
    assert looked_up == keys[::-1]
    assert engine.store is store and engine.block_mode == "prefix"  # the reader changes nothing of the engine


# --- resuming ---------------------------------------------------------------------------------------------------


class FakeReader:
    """Deterministic answers: a mode is right when (question + its name's length) is even; it can be stopped."""

    def __init__(self, stop_after: int | None = None):
        self.calls: list[tuple[str, str]] = []
        self.stop_after = stop_after

    def answer(self, question, passages, mode):
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise KeyboardInterrupt
        self.calls.append((question, mode.name))
        i = int(question.split()[1].rstrip("?"))
        right = (i + len(mode.name)) % 2 == 0
        text = f"answer {i}\nmore" if right else "no idea"
        return GenerationResult(text, [1] * (i % 5 + 1), "stop", 100 + i, 90 if mode.prefill == "block" else 0,
                                10, 0.01 * (i + 1), 0.1)


SETTINGS = {"passages": "oracle-plus-random", "oracle_plus_random": 2, "gold_position": None, "seed": 0,
            "max_new_tokens": 8, "data": "qa.jsonl.gz", "start": 0, "questions": 12, "top_k": None,
            "index_passages": None}


def fake_questions(n: int = 12) -> list[EvalQuestion]:
    corpus = [item(i) for i in range(n)]
    return oracle_questions(corpus, corpus, 2, None, seed=0)


def test_a_stopped_run_resumes_and_gives_the_same_summary(tmp_path):
    questions, modes = fake_questions(), parse_modes("full,naive,prefix+sink=2")
    whole = ResultsFile(tmp_path / "whole.jsonl", SETTINGS)
    evaluate(questions, modes, FakeReader(), whole, progress=False)
    expected = summarize(questions, modes, whole.done)

    path = tmp_path / "stopped.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evaluate(questions, modes, FakeReader(stop_after=13), ResultsFile(path, SETTINGS), progress=False)
    with path.open("a") as f:
        f.write('{"question": 4, "mode": "pre')  # killed in the middle of a line
    reader = FakeReader()
    resumed = ResultsFile(path, SETTINGS)
    assert len(resumed.done) == 13
    evaluate(questions, modes, reader, resumed, progress=False)
    assert len(reader.calls) == 36 - 13  # finished pairs are not answered again
    assert summarize(questions, modes, ResultsFile(path, SETTINGS).done) == expected
    assert path.read_text().splitlines()[1:] == (tmp_path / "whole.jsonl").read_text().splitlines()[1:]

    again = FakeReader()
    evaluate(questions, modes, again, ResultsFile(path, SETTINGS), progress=False)
    assert again.calls == []
    with pytest.raises(EvaluationError, match="max_new_tokens 8 \\(now 16\\)"):
        ResultsFile(path, {**SETTINGS, "max_new_tokens": 16})
    ResultsFile(path, {**SETTINGS, "questions": 3, "start": 5})  # another slice of questions resumes too


def test_summary_pairs_every_mode_with_the_first():
    questions, modes = fake_questions(10), parse_modes("full,naive,prefix")
    results = ResultsFile(None, SETTINGS)
    evaluate(questions, modes, FakeReader(), results, progress=False)
    # "full" (4 letters) is right on even questions, "naive" (5) on odd ones, "prefix" (6) on even ones.
    summary = summarize(questions, modes, results.done)
    full, naive = summary["modes"]["full"], summary["modes"]["naive"]
    assert (full["n"], full["correct"], full["accuracy"]) == (10, 5, 0.5)
    assert full["mean_prompt_tokens"] == 104.5 and full["mean_block_tokens"] == 0 and naive["mean_block_tokens"] == 90
    assert full["mean_ttft_s"] == pytest.approx(0.055) and full["mean_answer_tokens"] == 3.0
    assert summary["paired"]["naive"] == {"against": "full", "n": 10, "b": 5, "c": 5, "p_value": 1.0,
                                          "accuracy_difference": 0.0}
    assert summary["paired"]["prefix"]["b"] == summary["paired"]["prefix"]["c"] == 0
    assert summary["recall"] == 1.0  # oracle passages always hold the gold one
    table = markdown_table(summary, SETTINGS | {"questions": 10})
    assert table.splitlines()[2].startswith("| full | 10 | 50.0% | 23.7%–76.3% |")
    assert "| naive | 10 | 50.0% |" in table and "+0.0 pts | 5 / 5 | 1 |" in table


def test_compare_pairs_two_runs_by_question_mode_by_mode(tmp_path, capsys):
    def run(name: str, settings: dict, right: dict[str, set[int]], passages=("p1", "p2")) -> Path:
        results = ResultsFile(tmp_path / f"{name}.results.jsonl", settings)
        for mode, correct in right.items():
            for q in range(6):
                results.add({"question": q, "mode": mode, "correct": q in correct,
                             "passages": list(passages if q else passages[::-1])})
        return results.path

    first = run("bf16", SETTINGS | {"dtype": "torch.bfloat16"}, {"full": {0, 1, 2}, "prefix": {0, 1, 2, 3}})
    second = run("fp32", SETTINGS | {"dtype": "torch.float32"}, {"full": {1, 2, 5}, "naive": {0}},
                 passages=("p2", "p1"))
    out = tmp_path / "compare.json"
    assert cli_main(["compare", str(first), str(second), "--json", str(out)]) == 0
    comparison = json.loads(out.read_text())
    # Only "full" was answered in both; question 0 only by the first run, 5 only by the second.
    assert comparison["rows"] == [{"mode": "full", "n": 6, "same_passages": 0, "first_accuracy": 0.5,
                                   "second_accuracy": 0.5, "b": 1, "c": 1, "p_value": 1.0}]
    assert comparison["settings_differ"] == {"dtype": ["torch.bfloat16", "torch.float32"]}
    assert "| full | 6 | 0 | 50.0% | 50.0% | 1 / 1 | 1 |" in capsys.readouterr().out
    assert cli_main(["compare", str(first), str(tmp_path / "missing.results.jsonl")]) == 1
    assert "no results file at" in capsys.readouterr().err


# --- the command, end to end on SmolLM2 ---------------------------------------------------------------------------


#: Made-up facts, one passage each: easy to retrieve, unknown to any model.
FACTS = [
    ("What colour is the Vardel lighthouse?", ["red"], "Vardel lighthouse",
     "The Vardel lighthouse stands on the northern cape and is painted bright red."),
    ("Who founded the town of Ostrel?", ["Mira Kolb"], "Ostrel",
     "The town of Ostrel was founded in 1642 by the merchant Mira Kolb."),
    ("What do the people of Quenby grow?", ["saffron"], "Quenby",
     "Farmers in the valley of Quenby grow saffron on terraced fields."),
    ("How long is the Tarn bridge?", ["340 metres"], "Tarn bridge",
     "The Tarn bridge crosses the river in a single span of 340 metres."),
]


@pytest.mark.slow
def test_eval_command_end_to_end(tmp_path, capsys):
    data = write_qa(tmp_path / "qa.jsonl.gz", FACTS)
    out, index = tmp_path / "out" / "eval.json", tmp_path / "index"

    def run(limit: int) -> dict:
        assert cli_main(["eval", str(data), "--index", str(index), "--top-k", "2", "--max-new-tokens", "4",
                         "--limit", str(limit), "--modes", "full,block,naive+sink=2", "--json", str(out),
                         "--no-progress"]) == 0
        return json.loads(out.read_text())

    run(2)
    results = out.with_suffix(".results.jsonl")
    assert len(results.read_text().splitlines()) == 1 + 2 * 3
    first = run(3)  # resumes: the first two questions are not answered again
    lines = results.read_text().splitlines()
    assert len(lines) == 1 + 3 * 3
    assert run(3) == first and results.read_text().splitlines() == lines  # all done: nothing answered again

    assert first["settings"]["questions"] == 3 and first["settings"]["index_passages"] == 4
    assert first["retrieval"] == {"k": 2, "recall": 1.0}  # made-up facts, one passage each: easy to retrieve
    assert list(first["modes"]) == ["full", "block", "naive+sink=2"]
    full, block = first["modes"]["full"], first["modes"]["block"]
    assert full["n"] == block["n"] == 3 and full["mean_prompt_tokens"] == block["mean_prompt_tokens"]
    assert full["mean_block_tokens"] == 0 < block["mean_block_tokens"] < block["mean_prompt_tokens"]
    assert set(first["paired"]) == {"block", "naive+sink=2"} and first["paired"]["block"]["n"] == 3
    assert first["table"] in capsys.readouterr().out
    rows = [json.loads(line) for line in lines[1:]]
    for q in range(3):  # every mode of a question saw the same passages, the gold one last (the default order)
        assert len({tuple(r["passages"]) for r in rows if r["question"] == q}) == 1
        assert all(r["gold_rank"] == 1 for r in rows if r["question"] == q)


# --- never scoring an adapter on its training rows ----------------------------------------------------------------


def test_the_longest_untrained_run_of_rows():
    assert longest_untrained_run({0, 1, 5}, 10) == (6, 4)  # rows 6-9, longer than rows 2-4
    assert longest_untrained_run({2, 3}, 6) == (0, 2)  # the first of two runs as long
    assert longest_untrained_run(set(), 4) == (0, 4)
    assert longest_untrained_run({0, 1, 2}, 3) is None


def adapter_with_rows(folder: Path, trained_on: list[TrainingRows] | None) -> Path:
    """An adapter folder's record saying which rows it was trained on (all the guard reads)."""
    folder.mkdir()
    record = {} if trained_on is None else {"trained_on": [rows.to_json() for rows in trained_on]}
    (folder / ADAPTER_SETTINGS).write_text(json.dumps(record))
    return folder


def test_an_adapter_is_refused_on_the_rows_it_was_trained_on(tmp_path, caplog):
    data = write_qa(tmp_path / "qa.jsonl.gz", [(f"q{i}?", [f"a{i}"], f"T{i}", f"text {i}") for i in range(10)])
    other = write_qa(tmp_path / "other.jsonl.gz", [("q?", ["a"], "T", "another file")])
    sha = file_sha256(data)
    trained = [TrainingRows(sha, tuple(range(3, 10)), "elsewhere/qa.jsonl.gz"), TrainingRows(file_sha256(other), (0,))]
    adapter = adapter_with_rows(tmp_path / "adapter", trained)
    with pytest.raises(TrainedRowsError, match=r"trained on 7 of the 10 questions this evaluation would score \(rows "
                       r"3, 4, 5, 6, 7, \.\.\. of qa\.jsonl\.gz\).*--start 0 --limit 3 \(rows 0-2"):
        check_untrained(adapter, data, sha, range(10))
    with pytest.raises(TrainedRowsError, match=r"1 of the 2 questions .*\(rows 3 of qa"):
        check_untrained(adapter, data, sha, [2, 3])
    assert check_untrained(adapter, data, sha, [0, 1, 2]) == trained  # untrained rows: scored
    assert check_untrained(adapter, other, "0" * 64, [0]) == trained  # rows of another file (other bytes) are not
    everything = adapter_with_rows(tmp_path / "everything", [TrainingRows(sha, tuple(range(10)))])
    with pytest.raises(TrainedRowsError, match="every row of the file was trained on"):
        check_untrained(everything, data, sha, [4])
    with caplog.at_level("WARNING"):
        assert check_untrained(adapter_with_rows(tmp_path / "old", None), data, sha, range(10)) is None
    assert "does not record the rows it was trained on" in caplog.text


def test_finetune_then_eval_never_scores_the_training_rows(tmp_path, capsys):
    """`blockrag finetune` records the rows; `blockrag eval --adapter` refuses them and records them in its result."""
    data = write_qa(tmp_path / "qa.jsonl.gz", FACTS)
    base, index, adapter = tmp_path / "base", tmp_path / "index", tmp_path / "adapter"
    tiny_model("llama").save_pretrained(base)
    load_model(DEFAULT_MODEL).tokenizer.save_pretrained(base)
    ingest(qa_documents(data), index, engine=BlockEngine(load_model(str(base), dtype="float32")), model=str(base),
           progress=False)
    assert cli_main(["finetune", str(data), "--index", str(index), "--out", str(adapter), "--model", str(base),
                     "--start", "2", "--top-k", "2", "--epochs", "1", "--rank", "4", "--no-progress"]) == 0
    assert adapter_training_rows(adapter) == [TrainingRows(file_sha256(data), (2, 3), str(data))]

    out = tmp_path / "eval.json"
    command = ["eval", str(data), "--index", str(index), "--model", str(base), "--adapter", str(adapter), "--dtype",
               "float32", "--top-k", "2", "--max-new-tokens", "2", "--modes", "full,block", "--json", str(out),
               "--no-progress"]
    capsys.readouterr()
    assert cli_main(command) == 1  # refused, with the error's own advice
    assert re.search(r"TrainedRowsError: .*trained on 2 of the 4 questions .*\(rows 2, 3 of qa\.jsonl\.gz\).*"
                     r"--start 0 --limit 2", capsys.readouterr().err)
    assert cli_main([*command, "--start", "3"]) == 1
    assert "TrainedRowsError: " in (err := capsys.readouterr().err) and "1 of the 1 questions" in err
    assert not out.exists() and not out.with_suffix(".results.jsonl").exists()  # refused before answering
    assert cli_main([*command, "--limit", "2"]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["adapter_trained_on"] == [{"sha256": file_sha256(data), "path": str(data), "count": 2,
                                                         "ranges": [[2, 3]]}]
    assert result["modes"]["full"]["n"] == result["modes"]["block"]["n"] == 2
    assert json.loads(out.with_suffix(".results.jsonl").read_text().splitlines()[0])["settings"] == result["settings"]
