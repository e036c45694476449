"""Block fine-tuning on a tiny random Llama: training computes what inference computes, and adapters round-trip."""

from __future__ import annotations

import json
import random
import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig

from blockrag.engine import DEFAULT_MODEL, BlockEngine, LoadedModel, load_model, model_fingerprint
from blockrag.errors import AdapterMismatchError, AdapterNotFoundError, InvalidArgumentError
from blockrag.engine.adapter import (ADAPTER_SETTINGS, UNRECORDED_PASSAGE_ORDER, TrainingRows, adapter_passage_order,
                                     adapter_training_rows, file_sha256, lora_shape, row_ranges)
from blockrag.engine.transformer import Positions, forward
from blockrag.evaluation.qa import QAItem
from blockrag.retriever import IndexMismatchError, ScoredNode
from blockrag.training.examples import training_example
from blockrag.training.trainer import (IGNORE_INDEX, ExampleSource, FinetuneSettings, TrainingExample, answer_logits,
                                       example_loss, example_tokens, finetune)
from tiny_models import block_attention_mask

EXAMPLE = TrainingExample(
    passages=("The Pellam lighthouse was lit in 1871 and automated in 1990.",
              "Marrowbridge is a market town on the river Esk, famous for its cider.",
              "The Qelvar railway opened in 1902; it climbs 900 metres in 14 kilometres."),
    question="When was the Pellam lighthouse lit?",
    answer="In 1871.",
)


def tiny_llama(seed: int = 0, attn: str = "eager"):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, vocab_size=49152)
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_model(DEFAULT_MODEL).tokenizer


def engine_for(model, tokenizer, block_mode="naive") -> BlockEngine:
    return BlockEngine(LoadedModel(model, tokenizer, model_fingerprint(model, tokenizer)), block_mode=block_mode)


@torch.no_grad()
def inference_logits(engine: BlockEngine, example: TrainingExample, mode: str, block_mode: str | None) -> torch.Tensor:
    """What the engine computes for the answer tokens: the prefill's last logits, then the answer fed on its cache."""
    tokens = example_tokens(engine, example)
    answer = tokens.input_ids[tokens.answer_start:-1]  # the answer without its EOS: each predicts the next
    done = engine.prefill(example.system_prompt, list(example.passages), example.question, mode=mode,
                          block_mode=block_mode, max_new_tokens=len(answer))
    assert done.prompt_tokens == tokens.answer_start  # the same prompt, token for token
    positions = Positions.span(tokens.answer_start, len(answer))
    rest = forward(engine.model, done.cache, answer[None], positions, logits=len(answer))[0]
    return torch.cat([done.logits[None], rest])


# Each block mode against the attention it must differ from: full attention (the mask matters), and for prefix
# blocks naive ones (what passages are encoded after matters).
@pytest.mark.parametrize("block_mode, attn, system_prompt, other", [
    ("naive", "eager", None, "full"), ("naive", "sdpa", None, "full"), ("prefix", "eager", "Answer in one line.", "naive")])
def test_block_training_equals_block_inference(tokenizer, block_mode, attn, system_prompt, other):
    engine = engine_for(tiny_llama(attn=attn), tokenizer, block_mode)
    example = TrainingExample(EXAMPLE.passages, EXAMPLE.question, EXAMPLE.answer, system_prompt=system_prompt)
    tokens = example_tokens(engine, example)
    with torch.no_grad():
        trained = answer_logits(engine.model, tokens, block_mode)
        contrast = answer_logits(engine.model, tokens, other)
    expected = inference_logits(engine, example, "block", block_mode)
    torch.testing.assert_close(trained, expected, rtol=0, atol=1e-4)
    assert (contrast - expected).abs().max() > 1e-2


def test_full_attention_training_equals_full_inference(tokenizer):
    engine = engine_for(tiny_llama(), tokenizer)
    with torch.no_grad():
        trained = answer_logits(engine.model, example_tokens(engine, EXAMPLE), "full")
    torch.testing.assert_close(trained, inference_logits(engine, EXAMPLE, "full", None), rtol=0, atol=1e-4)


def test_block_training_gradients_equal_the_masked_forward(tokenizer):
    """Gradients reach every weight through the assembled blocks (re-rotation and cache included): in naive mode
    they equal those of the paper's contiguous forward under the Block-Attention mask."""
    engine = engine_for(tiny_llama(), tokenizer, "naive")
    model, tokens = engine.model, example_tokens(engine, EXAMPLE)
    example_loss(model, tokens, "naive").backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    mask = block_attention_mask(list(tokens.segments))
    model(input_ids=tokens.input_ids[None], attention_mask=mask, labels=tokens.labels[None]).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert ours["model.layers.0.self_attn.k_proj.weight"].abs().max() > 0  # passages' keys are trained


def test_loss_covers_the_answer_and_eos_only(tokenizer):
    engine = engine_for(tiny_llama(), tokenizer)
    tokens = example_tokens(engine, EXAMPLE)
    answer = tokenizer(EXAMPLE.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labelled = (tokens.labels != IGNORE_INDEX).nonzero().flatten().tolist()
    assert labelled == list(range(len(tokens) - len(answer), len(tokens))) and tokens.answer_start == labelled[0]
    assert tokens.labels[labelled].tolist() == tokens.input_ids[labelled].tolist() == answer
    # head, three passages' blocks (each ending with its blank line), question, answer
    assert [kind for _, kind in tokens.segments] == ["text", "block", "block", "block", "text", "text"]
    with torch.no_grad():
        ours = example_loss(engine.model, tokens, "full")
        # transformers' own shifted loss over the labelled tokens
        hf = engine.model(input_ids=tokens.input_ids[None], labels=tokens.labels[None]).loss
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """A tiny model saved as a model folder, and an adapter trained on it for a few steps."""
    base = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(base)
    tokenizer.save_pretrained(base)
    engine = BlockEngine(load_model(str(base), dtype="float32"), block_mode="prefix")
    before = engine.fingerprint
    settings = FinetuneSettings(epochs=20, lr=3e-3, rank=4, full_fraction=0.5, block_mode="prefix", seed=1)
    adapter = tmp_path_factory.mktemp("adapter")
    report = finetune(engine, [EXAMPLE], adapter, settings, base_model=str(base), progress=False)
    assert model_fingerprint(engine.model, tokenizer) == before  # the engine's model is the base model again
    return base, adapter, report, engine


def test_training_lowers_the_loss_and_saves_safetensors(trained):
    base, adapter, report, engine = trained
    assert sorted(p.name for p in adapter.iterdir()) == sorted(
        ["adapter_model.safetensors", "adapter_config.json", ADAPTER_SETTINGS, "README.md"])
    record = json.loads((adapter / ADAPTER_SETTINGS).read_text())
    assert record["base_fingerprint"] == engine.fingerprint and record["settings"]["rank"] == 4
    assert len(report.losses) == 20 and 0 < report.full_steps < 20
    tuned = load_model(str(base), dtype="float32", adapter=adapter).model
    tokens = example_tokens(engine, EXAMPLE)
    with torch.no_grad():
        for attention in ("prefix", "full"):
            assert example_loss(tuned, tokens, attention) < example_loss(engine.model, tokens, attention) - 1.0


def test_adapter_loads_merged_and_renames_the_model(trained):
    base, adapter, _, engine = trained
    loaded = load_model(str(base), dtype="float32", adapter=adapter)
    assert loaded.fingerprint != engine.fingerprint
    assert loaded.passage_order == engine.passage_order == "best-last"  # as trained (the default)
    assert not any("lora" in name for name in loaded.model.state_dict())  # a plain model
    reference = PeftModel.from_pretrained(load_model(str(base), dtype="float32").model, adapter).eval()  # unmerged
    ids = example_tokens(engine, EXAMPLE).input_ids[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=0, atol=1e-4)


def test_adapter_of_another_base_or_no_adapter_is_refused(trained, tokenizer, tmp_path):
    _, adapter, _, _ = trained
    other = tmp_path / "other"
    tiny_llama(seed=5).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(AdapterMismatchError, match="trained on a base model"):
        load_model(str(other), adapter=adapter)
    with pytest.raises(AdapterNotFoundError, match="holds no LoRA adapter"):
        load_model(str(other), adapter=tmp_path / "empty")


def test_training_resumes_from_a_saved_adapter(trained, tmp_path):
    base, adapter, _, engine = trained
    settings = FinetuneSettings(epochs=2, lr=3e-3, rank=4, full_fraction=0.0, block_mode="prefix", seed=2)
    tokens = example_tokens(engine, EXAMPLE)
    with torch.no_grad():
        base_loss = example_loss(engine.model, tokens, "prefix").item()
    report = finetune(engine, [EXAMPLE], tmp_path / "more", settings, base_model=str(base), resume=adapter,
                      progress=False)
    # The first step already runs with the trained adapter, which lowers the loss by more than 1 (test above);
    # a fresh LoRA starts at the base model's loss (its B matrices are zero), up to dropout.
    assert report.losses[0] < base_loss - 1.0
    record = json.loads((tmp_path / "more" / ADAPTER_SETTINGS).read_text())
    assert record["resumed_from"]["folder"] == str(adapter) and record["resumed_from"]["steps"] == 20
    assert record["resumed_from"]["settings"]["epochs"] == 20 and record["settings"]["epochs"] == 2
    assert lora_shape(tmp_path / "more") == lora_shape(adapter)
    resumed = load_model(str(base), dtype="float32", adapter=tmp_path / "more")
    first = load_model(str(base), dtype="float32", adapter=adapter)
    assert resumed.fingerprint != first.fingerprint
    assert model_fingerprint(engine.model, engine.tokenizer) == engine.fingerprint  # base weights restored


def test_an_adapter_keeps_the_passage_order_it_was_trained_with(trained, tmp_path):
    base, adapter, _, engine = trained
    old = tmp_path / "old"  # an adapter recorded before the order was: trained best first
    shutil.copytree(adapter, old)
    record = json.loads((old / ADAPTER_SETTINGS).read_text())
    del record["settings"]["passage_order"]
    (old / ADAPTER_SETTINGS).write_text(json.dumps(record))
    loaded = load_model(str(base), dtype="float32", adapter=old)
    assert loaded.passage_order == BlockEngine(loaded).passage_order == "best-first"
    with pytest.raises(ValueError, match="trained with passages placed best-first"):
        finetune(engine, [EXAMPLE], tmp_path / "out", FinetuneSettings(rank=4), resume=old, progress=False)
    with pytest.raises(ValueError, match="passage_order must be one of"):
        FinetuneSettings(passage_order="best-middle")


def test_an_adapter_without_a_record_reads_best_first_as_one_recorded_without_the_order(trained, tmp_path, caplog):
    """Both come from before the order was recorded, when training placed passages best first: one default."""
    base, adapter, _, _ = trained
    bare, old = tmp_path / "bare", tmp_path / "old"
    shutil.copytree(adapter, bare)
    (bare / ADAPTER_SETTINGS).unlink()
    shutil.copytree(adapter, old)
    record = json.loads((old / ADAPTER_SETTINGS).read_text())
    del record["settings"]["passage_order"]
    (old / ADAPTER_SETTINGS).write_text(json.dumps(record))
    assert adapter_passage_order(bare) == adapter_passage_order(old) == UNRECORDED_PASSAGE_ORDER == "best-first"
    assert adapter_passage_order(adapter) == "best-last"  # recorded: as trained
    with caplog.at_level("WARNING"):
        loaded = load_model(str(base), dtype="float32", adapter=bare)
    assert loaded.passage_order == "best-first" and "cannot check that the adapter was trained on" in caplog.text
    assert adapter_training_rows(bare) is None and adapter_training_rows(old) is None  # rows not recorded


def test_row_ranges_keep_a_record_short_and_read_back_exactly():
    assert row_ranges([9, 3, 4, 5, 7, 4]) == [[3, 5], [7, 7], [9, 9]] and row_ranges([]) == []
    rows = TrainingRows("ab" * 32, (300, *range(301, 1000), 5), "qa.jsonl.gz")
    assert rows.rows[0] == 5 and len(rows.rows) == 701
    assert rows.to_json() == {"sha256": "ab" * 32, "path": "qa.jsonl.gz", "count": 701,
                              "ranges": [[5, 5], [300, 999]]}
    assert TrainingRows.from_json(json.loads(json.dumps(rows.to_json()))) == rows
    with pytest.raises(ValueError, match="from 0"):
        TrainingRows("ab" * 32, (-1,))


def test_an_adapter_records_the_qa_rows_it_trained_on(trained, tmp_path):
    base, adapter, _, engine = trained
    qa = tmp_path / "qa.jsonl"
    qa.write_text("the bytes of a QA file: their hash names it\n")
    too_long = TrainingExample(EXAMPLE.passages * 20, EXAMPLE.question, EXAMPLE.answer)  # over the 512 positions
    settings = FinetuneSettings(epochs=1, rank=4, full_fraction=0.0, block_mode="prefix")
    report = finetune(engine, [EXAMPLE, too_long, EXAMPLE], tmp_path / "a", settings,
                      source=ExampleSource(qa, (7, 8, 3)), progress=False)
    assert report.skipped == 1
    record = json.loads((tmp_path / "a" / ADAPTER_SETTINGS).read_text())
    assert record["format"] == 2
    assert record["trained_on"] == [{"sha256": file_sha256(qa), "path": str(qa), "count": 2,
                                     "ranges": [[3, 3], [7, 7]]}]  # row 8's example was skipped: not trained on
    assert adapter_training_rows(tmp_path / "a") == [TrainingRows(file_sha256(qa), (3, 7), str(qa))]
    # Resumed, the new adapter has been trained on the old one's rows too.
    finetune(engine, [EXAMPLE], tmp_path / "b", settings, resume=tmp_path / "a", source=ExampleSource(qa, (4,)),
             progress=False)
    assert adapter_training_rows(tmp_path / "b") == [TrainingRows(file_sha256(qa), (3, 4, 7), str(qa))]
    # Resumed from an adapter whose rows are unknown (trained without a source), the rows stay unknown.
    finetune(engine, [EXAMPLE], tmp_path / "c", settings, resume=adapter, source=ExampleSource(qa, (4,)),
             progress=False)
    assert adapter_training_rows(adapter) is None and adapter_training_rows(tmp_path / "c") is None
    with pytest.raises(InvalidArgumentError, match="2 rows for 1 examples"):
        finetune(engine, [EXAMPLE], tmp_path / "d", settings, source=ExampleSource(qa, (1, 2)), progress=False)
    assert not (tmp_path / "d").exists()


def test_resuming_needs_the_adapter_shape_and_base_model(trained, tokenizer, tmp_path):
    base, adapter, _, engine = trained
    with pytest.raises(ValueError, match="LoRA settings"):
        finetune(engine, [EXAMPLE], tmp_path / "out", FinetuneSettings(rank=8), resume=adapter, progress=False)
    with pytest.raises(AdapterNotFoundError, match="holds no LoRA adapter"):
        finetune(engine, [EXAMPLE], tmp_path / "out", FinetuneSettings(rank=4), resume=tmp_path, progress=False)
    other = tmp_path / "other"
    tiny_llama(seed=5).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(AdapterMismatchError, match="trained on a base model"):
        finetune(BlockEngine(load_model(str(other))), [EXAMPLE], tmp_path / "out", FinetuneSettings(rank=4),
                 resume=adapter, progress=False)
    assert not (tmp_path / "out").exists()


class _Index:
    """The parts of an Index that building training examples reads: passages by node and by document."""

    folder = "fake-index"

    def __init__(self, docs: dict[str, list[str]]):
        self.by_id = {f"{d}:{i}": (d, text) for d, texts in docs.items() for i, text in enumerate(texts)}

    def nodes(self, ids):
        return [SimpleNamespace(id=i, doc_id=self.by_id[i][0], text=self.by_id[i][1]) for i in ids]

    def document_nodes(self, doc_id):
        return self.nodes([i for i, (d, _) in self.by_id.items() if d == doc_id])


class _Retriever:
    def __init__(self, index: _Index, ranking: list[str]):
        self.index, self.ranking = index, ranking

    def retrieve(self, question, top_k):
        return [ScoredNode(node, 1.0) for node in self.index.nodes(self.ranking[:top_k])]


def test_training_examples_always_hold_the_gold_passage():
    index = _Index({"gold": ["Intro of the page.", "The telescope is named Cassandra."],
                    "a": ["Passage A."], "b": ["Passage B."], "c": ["Passage C."]})
    item = QAItem(7, "What is the telescope called?", ("Cassandra",), "gold", "unused")
    ranked = _Retriever(index, ["b:0", "gold:1", "a:0"])
    found = training_example(ranked, item, 3, random.Random(0))
    assert found == TrainingExample(("Passage A.", "The telescope is named Cassandra.", "Passage B."),
                                    item.question, "Cassandra")  # retrieved: placed best last, as eval places them
    assert training_example(ranked, item, 3, random.Random(0), "best-first").passages == found.passages[::-1]
    missed = [training_example(_Retriever(index, ["a:0", "b:0", "c:0"]), item, 3, random.Random(seed))
              for seed in range(8)]
    for example in missed:  # the answering gold passage replaces the last retrieved one, at a seeded position
        assert sorted(example.passages) == sorted(["Passage A.", "Passage B.", "The telescope is named Cassandra."])
    assert len({e.passages.index("The telescope is named Cassandra.") for e in missed}) > 1
    with pytest.raises(IndexMismatchError, match="does not hold document"):
        training_example(_Retriever(index, ["a:0"]), QAItem(8, "q", ("x",), "absent", ""), 1, random.Random(0))
