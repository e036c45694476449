"""Block fine-tuning: LoRA adapters trained under the Block-Attention mask, on examples built from a QA file.

    items = load_qa("qa.jsonl.gz", start=300)
    examples = training_examples(Retriever(index), items, top_k=10, seed=0)
    report = finetune(engine, examples, "adapter", FinetuneSettings(), source=example_source("qa.jsonl.gz", items))
    loaded = load_model(DEFAULT_MODEL, adapter="adapter")   # merged: a plain model with its own fingerprint

The adapter folder's format (weights, config, record of settings and rows trained on) is read and
written by :mod:`blockrag.engine.adapter` alone, since the engine loads adapters.
"""

from .examples import example_source, training_example, training_examples
from .trainer import (IGNORE_INDEX, LORA_TARGETS, ExampleSource, ExampleTokens, FinetuneReport, FinetuneSettings,
                      TrainingExample, answer_logits, example_loss, example_tokens, finetune)

__all__ = [
    "IGNORE_INDEX", "LORA_TARGETS", "ExampleSource", "ExampleTokens", "FinetuneReport", "FinetuneSettings",
    "TrainingExample", "answer_logits", "example_loss", "example_tokens", "example_source", "finetune",
    "training_example", "training_examples",
]
