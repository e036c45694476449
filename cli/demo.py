"""``blockrag demo``: a few questions over passages written for the project, answered in both modes."""

from __future__ import annotations

import argparse

PASSAGES = [
    "The Larkspur Observatory stands on Mount Tamsin in northern Wales. It opened in 1962 and houses a "
    "1.2-metre reflecting telescope named Cassandra.",
    "Marrowbridge is a market town on the River Ende. Its annual cheese fair, held every October since 1741, "
    "draws about forty thousand visitors.",
    "The Velloran language is spoken by roughly 12,000 people on the island of Tesk. It has no grammatical "
    "gender and writes with a 24-letter alphabet.",
    "The glass-winged heron nests only in the salt marshes of the Orrin delta. Its eggs are pale green and "
    "hatch after 26 days.",
]
QUESTIONS = [
    "What is the telescope at the Larkspur Observatory called?",
    "When is the Marrowbridge cheese fair held?",
    "How many people speak Velloran?",
]


def run(args: argparse.Namespace) -> int:
    from blockrag.engine import BlockEngine

    engine = BlockEngine.from_pretrained(args.model)
    blocks = engine.encode(PASSAGES)  # what ingestion does once, ahead of any question
    for question in QUESTIONS:
        print(f"\nQ: {question}")
        for mode in ("full", "block"):
            passages = PASSAGES if mode == "full" else blocks
            r = engine.generate(None, passages, question, mode=mode, max_new_tokens=48)
            print(f"  [{mode:5}] TTFT {r.ttft_s * 1000:7.1f} ms, {r.prefilled_tokens:4d} of {r.prompt_tokens} "
                  f"prompt tokens prefilled | {r.text.strip()}")
    return 0
