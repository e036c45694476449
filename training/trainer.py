"""Block fine-tuning: LoRA training under Block-Attention, so a model answers well from blocks.

Without fine-tuning, passages that never attended to each other cost accuracy (see README). Each
training example is laid out exactly as :class:`BlockEngine` prompts (head, each passage's block
ending with its blank-line separator, the question), by the engine's own :func:`prompt_layout` and tokenization,
followed by the answer and the EOS token; the loss is cross-entropy on the answer tokens only.

A block-mode step computes what inference computes, differentiably: the head and the passages are
encoded as blocks (passages alone in ``naive`` mode, after the head in ``prefix`` mode), assembled
at their places with re-rotated keys, and the question and answer prefilled over them.
So training sees exactly the positions inference sees: a prefix block's KV always comes from right
after the head, wherever the passage then sits (tested: equal logits). A seeded fraction of steps
(``full_fraction``, the paper's ``train_full_attention``) trains the same example with plain causal
attention instead, so one model serves both block and full mode.

Only LoRA weights are trained (peft); :func:`finetune` saves them through
:func:`blockrag.engine.adapter.save_adapter` (safetensors plus a JSON record of the settings, the
base model's fingerprint and the QA rows trained on), and ``load_model(..., adapter=folder)``
merges them back into a plain model. Training can go on from a saved adapter (``resume``), so a
run can be extended with more epochs or other examples later.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from blockrag.engine.adapter import (TrainingRows, adapter_passage_order, adapter_record, adapter_training_rows,
                                     check_adapter, file_sha256, lora_shape, merge_training_rows, save_adapter)
from blockrag.engine.blocks import BLOCK_MODES, BlockMode, assemble, encode_batch, prefill_over_blocks
from blockrag.engine.generate import BlockEngine, prompt_layout
from blockrag.engine.model import package_versions
from blockrag.engine.prompt import DEFAULT_PASSAGE_ORDER, PASSAGE_ORDERS, PassageOrder, tokenize
from blockrag.errors import InvalidArgumentError, MissingExtraError

if TYPE_CHECKING:  # transformers' model classes load slowly; only their names are needed here
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

#: What an example attends to in training: a block mode, or plain causal attention.
TrainAttention = Literal["naive", "prefix", "full"]
#: A piece of an example: a passage (``"block"``) or prompt text around it (``"text"``).
SegmentKind = Literal["block", "text"]
#: Label of tokens without loss (PyTorch's and transformers' convention).
IGNORE_INDEX = -100
#: Attention and MLP projections of every supported family (Llama, Mistral, Qwen2, Qwen3).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainingExample:
    """One question answered over passages after ``system_prompt`` (None: the engine's default)."""

    passages: tuple[str, ...]
    question: str
    answer: str
    system_prompt: str | None = None


@dataclass(frozen=True)
class ExampleSource:
    """The QA file examples were built from and each one's row in it (line from 0), in the examples' order.

    The adapter records the file's hash and the rows trained on, so that an evaluation can refuse to
    score the questions it was trained on.
    """

    path: str | os.PathLike
    rows: tuple[int, ...]


@dataclass(frozen=True)
class ExampleTokens:
    """An example's token ids in the engine's layout, its labels (answer only) and its segments."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    """``IGNORE_INDEX`` everywhere except the answer tokens and the EOS token after them."""
    segments: tuple[tuple[int, SegmentKind], ...]
    """Lengths and kinds in order: passages are ``"block"``, everything else (answer included) ``"text"``."""
    head_tokens: int
    answer_start: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def passage_spans(self) -> list[tuple[int, int]]:
        """``(start, length)`` of each passage in the example."""
        spans, at = [], 0
        for n, kind in self.segments:
            if kind == "block":
                spans.append((at, n))
            at += n
        return spans


@dataclass(frozen=True)
class _Passage:
    """A passage inside a layout, told apart from the prompt text around it: its block's place."""

    text: str


def example_tokens(engine: BlockEngine, example: TrainingExample) -> ExampleTokens:
    """Tokenize ``example`` exactly as ``engine`` prompts it, then append the answer and the EOS token."""
    eos = engine.tokenizer.eos_token_id
    if eos is None:
        raise InvalidArgumentError("the tokenizer has no EOS token, so an answer's end cannot be learnt; set tokenizer.eos_token")
    answer = tokenize(engine.tokenizer, example.answer.strip())
    if not answer:
        raise InvalidArgumentError(f"the answer to {example.question!r} is empty; every example needs an answer to learn")
    template = engine.template(example.system_prompt)
    layout = prompt_layout(template.head, [_Passage(p) for p in example.passages],
                           template.question_text(example.question))
    pieces: list[tuple[list[int], SegmentKind]] = [
        (engine.passage_token_ids(s.text), "block") if isinstance(s, _Passage) else (tokenize(engine.tokenizer, s), "text")
        for s in layout  # type: ignore[arg-type]
    ]
    pieces.append(([*answer, eos], "text"))
    ids = torch.tensor([t for piece, _ in pieces for t in piece], dtype=torch.long)
    answer_start = len(ids) - len(answer) - 1
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[answer_start:] = ids[answer_start:]
    return ExampleTokens(ids, labels, tuple((len(p), kind) for p, kind in pieces), len(pieces[0][0]), answer_start)


def answer_logits(model: PreTrainedModel, tokens: ExampleTokens, attention: TrainAttention) -> torch.Tensor:
    """Logits predicting each answer token and the EOS, ``[answer tokens + 1, vocab]``, under ``attention``.

    Only the rows that predict labelled tokens go through the LM head.
    """
    if attention != "full" and attention not in BLOCK_MODES:
        raise InvalidArgumentError(f"attention must be 'full' or one of {BLOCK_MODES}, got {attention!r}")
    device = next(model.parameters()).device
    ids, keep = tokens.input_ids.to(device), len(tokens) - tokens.answer_start + 1
    if attention == "full":
        out = model(input_ids=ids[None], logits_to_keep=keep, use_cache=False)
        return out.logits[0, :-1]
    head = encode_batch(model, [tokens.input_ids[:tokens.head_tokens].tolist()])[0]
    spans = tokens.passage_spans()
    passages = encode_batch(model, [tokens.input_ids[s:s + n].tolist() for s, n in spans],
                            head if attention == "prefix" else None)
    cache = assemble(model, [head, *passages], [0, *(s for s, _ in spans)], len(tokens))
    in_block = torch.zeros(len(tokens), dtype=torch.bool, device=device)
    for s, n in [(0, tokens.head_tokens), *spans]:
        in_block[s:s + n] = True
    return prefill_over_blocks(model, ids, cache, ~in_block, keep)[:-1]


def example_loss(model: PreTrainedModel, tokens: ExampleTokens, attention: TrainAttention) -> torch.Tensor:
    """Mean cross-entropy over the labelled (answer) tokens of one example."""
    logits = answer_logits(model, tokens, attention)
    targets = tokens.labels[tokens.answer_start:].to(logits.device)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)


@dataclass(frozen=True)
class FinetuneSettings:
    """LoRA and optimisation settings; recorded beside the adapter."""

    epochs: int = 1
    lr: float = 2e-4
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    full_fraction: float = 0.5
    """Share of steps trained with plain causal attention (the paper's ``train_full_attention``)."""
    block_mode: BlockMode = "prefix"
    seed: int = 0
    max_tokens: int | None = None
    """Examples longer than this (prompt and answer) are skipped; None: the model's context."""
    target_modules: tuple[str, ...] = LORA_TARGETS
    passage_order: PassageOrder = DEFAULT_PASSAGE_ORDER
    """How the examples place their passages. Recorded, and the adapter's model places them so: an adapter
    reads well only in the order it was trained in (benchmarks/RESULTS.md)."""

    def lora_shape(self) -> dict:
        """The LoRA settings an adapter is saved with, in the form :func:`blockrag.engine.adapter.lora_shape` reads
        them back."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": tuple(sorted(self.target_modules))}

    def __post_init__(self) -> None:
        if self.block_mode not in BLOCK_MODES:
            raise InvalidArgumentError(f"block_mode must be one of {BLOCK_MODES}, got {self.block_mode!r}")
        if self.passage_order not in PASSAGE_ORDERS:
            raise InvalidArgumentError(f"passage_order must be one of {PASSAGE_ORDERS}, got {self.passage_order!r}")
        if self.epochs < 1 or self.rank < 1 or not self.lr > 0 or not 0 <= self.full_fraction <= 1:
            raise InvalidArgumentError("need epochs >= 1, rank >= 1, lr > 0 and 0 <= full_fraction <= 1, got "
                             f"{self.epochs}, {self.rank}, {self.lr}, {self.full_fraction}")


@dataclass
class FinetuneReport:
    """What a training run did: examples used and skipped, the loss of every step, and its duration."""

    folder: Path
    examples: int
    skipped: int
    losses: list[float] = field(repr=False)
    full_steps: int
    seconds: float

    def mean_loss(self, part: Literal["first", "last"]) -> float:
        """Mean loss over the first or last tenth of the steps (at least one step)."""
        n = max(1, len(self.losses) // 10)
        chunk = self.losses[:n] if part == "first" else self.losses[-n:]
        return sum(chunk) / len(chunk)

    def __str__(self) -> str:
        return (f"{len(self.losses)} steps on {self.examples} examples ({self.skipped} too long, skipped; "
                f"{self.full_steps} steps with full attention) in {self.seconds:.0f} s; loss "
                f"{self.mean_loss('first'):.3f} -> {self.mean_loss('last'):.3f}; adapter in {self.folder}")


def _trained_on(known: list[TrainingRows] | None, source: ExampleSource | None,
                kept: Sequence[int]) -> list[TrainingRows] | None:
    """The QA rows an adapter has been trained on: a resumed adapter's (``known``; None if unknown) and the rows of
    the examples trained on (``kept``, indexes into ``source.rows``)."""
    if known is None:
        log.warning("the resumed adapter records no training rows, so the new one cannot either: evaluations "
                    "will not be able to refuse to score them")
        return None
    if source is None:
        if known:
            log.warning("no source given: the new examples' rows are unknown, so the adapter records none")
        return None
    rows = TrainingRows(file_sha256(source.path), tuple(source.rows[i] for i in kept), str(source.path))
    return merge_training_rows(known, [rows])


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise MissingExtraError("fine-tuning", "finetune", exc) from exc
    return peft


def finetune(engine: BlockEngine, examples: Sequence[TrainingExample], out: str | os.PathLike,
             settings: FinetuneSettings = FinetuneSettings(), *, base_model: str | None = None,
             resume: str | os.PathLike | None = None, source: ExampleSource | None = None,
             progress: bool = True) -> FinetuneReport:
    """Train a LoRA adapter of ``engine``'s model on ``examples`` and save it in the folder ``out``.

    One example per optimizer step (AdamW, constant learning rate), in a seeded order; each step
    trains under the block mask, or with probability ``full_fraction`` under full attention. The
    engine's model is restored to its base weights afterwards: apply the adapter with
    ``load_model(..., adapter=out)``. ``base_model`` (how to load the base model) is recorded.
    ``resume`` is an adapter folder of the same base model and LoRA shape to go on training
    (the optimizer starts afresh); the new record keeps the old one under ``resumed_from``.
    ``source`` names the QA file and row of every example: the file's hash and the rows trained on
    are recorded (with the resumed adapter's), and ``blockrag eval --adapter`` refuses to score
    them. Without it the record says nothing of the rows, and evaluations cannot check them.
    """
    peft = _peft()
    previous = None
    known_rows: list[TrainingRows] | None = []
    if source is not None and len(source.rows) != len(examples):
        raise InvalidArgumentError(f"source gives {len(source.rows)} rows for {len(examples)} examples; give each "
                                   "example's row, in the examples' order")
    if resume is not None:
        resume = check_adapter(resume, engine.fingerprint, next(engine.model.parameters()).dtype)
        if lora_shape(resume) != settings.lora_shape():
            raise InvalidArgumentError(f"the adapter in {resume} has LoRA settings {lora_shape(resume)}, but these settings ask "
                             f"for {settings.lora_shape()}; train on with the adapter's own "
                             "(blockrag.engine.adapter.lora_shape gives them)")
        trained_order = adapter_passage_order(resume)
        if trained_order != settings.passage_order:
            raise InvalidArgumentError(f"the adapter in {resume} was trained with passages placed {trained_order}, but these "
                             f"settings place them {settings.passage_order}; train on in the adapter's order")
        old = adapter_record(resume) or {}
        previous = {"folder": str(resume), **{k: v for k, v in old.items() if k not in ("losses", "versions")},
                    "steps": len(old.get("losses", []))}
        known_rows = adapter_training_rows(resume)
    limit = min(settings.max_tokens or engine.max_positions, engine.max_positions)
    all_tokens = [example_tokens(engine, e) for e in examples]
    kept = [i for i, t in enumerate(all_tokens) if len(t) <= limit]
    tokens = [all_tokens[i] for i in kept]
    if not tokens:
        raise InvalidArgumentError(f"no example fits in {limit} tokens ({len(all_tokens)} given); raise max_tokens or "
                         "pass fewer passages per example")
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)  # LoRA initialisation and dropout
    base_fingerprint = engine.fingerprint
    # Both inject LoRA layers into engine.model in place.
    if resume is not None:
        model = peft.PeftModel.from_pretrained(engine.model, resume, is_trainable=True)
    else:
        lora = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                               target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")
        model = peft.get_peft_model(engine.model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    losses: list[float] = []
    full_steps = 0
    started = time.perf_counter()
    try:
        model.train()
        with tqdm(total=settings.epochs * len(tokens), desc="finetune", unit="example", disable=not progress) as bar:
            for _ in range(settings.epochs):
                for i in rng.sample(range(len(tokens)), len(tokens)):
                    full = rng.random() < settings.full_fraction
                    full_steps += full
                    loss = example_loss(engine.model, tokens[i], "full" if full else settings.block_mode)
                    value = loss.item()
                    if not math.isfinite(value):
                        raise FloatingPointError(f"the loss became {value} at step {len(losses) + 1}; "
                                                 "lower the learning rate (lr)")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(value)
                    bar.update()
                    bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        folder = Path(out).expanduser()
        report = FinetuneReport(folder, len(tokens), len(all_tokens) - len(tokens), losses, full_steps,
                                time.perf_counter() - started)
        record = {"base_fingerprint": base_fingerprint, "base_model": base_model,
                  "base_dtype": str(next(engine.model.parameters()).dtype), "system_prompt": engine.system_prompt,
                  "settings": asdict(settings), "examples": report.examples, "skipped": report.skipped,
                  "full_steps": full_steps, "seconds": round(report.seconds, 1),
                  "losses": [round(x, 4) for x in losses], "versions": package_versions()}
        if previous is not None:
            record["resumed_from"] = previous
        save_adapter(model, folder, record, _trained_on(known_rows, source, kept))
    finally:
        model.unload()  # removes the LoRA layers: engine.model is the base model again
        engine.model.eval()
    return report
