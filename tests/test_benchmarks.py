"""The benchmarks run end to end at a tiny size (their figures come from real runs: benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from blockrag.cli import main
from blockrag.engine import model as model_module
from blockrag.benchmarks.decode import DATA
from tiny_models import on_grid, tiny_model


@pytest.fixture
def tiny_folder(smollm, tmp_path):
    folder = tmp_path / "tiny-model"
    model = tiny_model("llama")
    model.config.max_position_embeddings = 2048
    model.save_pretrained(folder)
    smollm.tokenizer.save_pretrained(folder)
    return folder


def test_answer_benchmark_rows_side_by_side_and_its_plot(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as where the llamacpp extra is not installed
    out, picture = tmp_path / "answer.json", tmp_path / "answer.png"
    assert main(["bench", "answer", "--model", str(tiny_folder), "--gguf", str(tmp_path / "model.gguf"),
                 "--passages", "1,3", "--passage-tokens", "20", "--new-tokens", "3", "--repeats", "1",
                 "--plot", str(picture), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 'pip install "blockrag[llamacpp]"' in result["llama_cpp_skipped"]
    assert [r["passages"] for r in result["results"]] == [1, 3]
    for r in result["results"]:
        rows = r["rows"]
        assert set(rows) == {"block", "full", "none"}
        assert rows["block"]["prompt_tokens"] == rows["full"]["prompt_tokens"] == r["prompt_tokens"]
        assert rows["full"]["prefilled_tokens"] == r["prompt_tokens"] > rows["block"]["prefilled_tokens"]
        assert rows["none"]["prompt_tokens"] < r["prompt_tokens"]
        assert all(row["total_s"] >= row["ttft_s"] > 0 and 1 <= row["new_tokens"] <= 3 for row in rows.values())
    assert result["results"][1]["prompt_tokens"] > result["results"][0]["prompt_tokens"]
    assert picture.read_bytes().startswith(b"\x89PNG")


FAKE_LLAMA_CPP = """
import json, os, time

class Llama:
    def __init__(self, model_path, n_ctx, n_threads, n_threads_batch, verbose):
        if not os.path.isfile(model_path):
            raise ValueError(f"Model path does not exist: {model_path}")
        self.log = model_path + ".calls"
        self._write({"loaded": [n_ctx, n_threads, n_threads_batch], "pid": os.getpid()})

    def _write(self, call):
        with open(self.log, "a") as f:
            f.write(json.dumps(call) + "\\n")

    def tokenize(self, text, add_bos, special):
        return list(text)

    def reset(self):
        self._write({"reset": True})

    def generate(self, tokens, temp, top_k, reset):
        self._write({"prompt_tokens": len(tokens), "temp": temp, "top_k": top_k})
        while True:
            time.sleep(0.005)  # a token takes 5 ms
            yield 7
"""


@pytest.fixture
def fake_llama_cpp(tmp_path, monkeypatch):
    """A stand-in ``llama_cpp`` on ``sys.path``, which the benchmark's spawned worker process imports too: it
    logs its calls beside the GGUF path it is given, and refuses a path that is no file, as llama.cpp does."""
    folder = tmp_path / "fake-site"
    folder.mkdir()
    (folder / "llama_cpp.py").write_text(FAKE_LLAMA_CPP)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)


def test_answer_benchmark_runs_llama_cpp_in_its_own_process(tiny_folder, tmp_path, fake_llama_cpp):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "answer.json"
    assert main(["bench", "answer", "--model", str(tiny_folder), "--gguf", str(gguf), "--passages", "1,2",
                 "--passage-tokens", "10", "--new-tokens", "3", "--repeats", "2", "--threads", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["llama_cpp_skipped"] is None
    calls = [json.loads(line) for line in (tmp_path / "model.gguf.calls").read_text().splitlines()]
    assert calls[0] == {"loaded": [2048, 1, 1], "pid": calls[0]["pid"]}  # the model's context, the threads asked
    assert calls[0]["pid"] != os.getpid() and sum("loaded" in c for c in calls) == 1  # once, in a worker process
    generations = [c for c in calls if "prompt_tokens" in c]
    assert len(generations) == 1 + 2 * 2  # the warm-up, then each passage count's repeats
    assert all(c["temp"] == 0.0 and c["top_k"] == 1 for c in generations)  # greedy
    assert sum("reset" in c for c in calls) == len(generations)  # no prefix reuse between runs
    for r in result["results"]:
        row = r["rows"]["llama.cpp"]
        assert row["new_tokens"] == 3 and row["ttft_s"] >= 0.005 and row["decode_ms_per_token"] >= 5
        assert row["total_s"] >= row["ttft_s"] + 0.009
        assert row["prompt_tokens"] == row["prefilled_tokens"] > r["prompt_tokens"]  # the stand-in counts bytes
    assert result["results"][1]["rows"]["llama.cpp"]["prompt_tokens"] > result["results"][0]["rows"]["llama.cpp"][
        "prompt_tokens"]


def test_answer_benchmark_says_when_llama_cpp_cannot_load_the_file(tiny_folder, tmp_path, fake_llama_cpp, capsys):
    assert main(["bench", "answer", "--model", str(tiny_folder), "--gguf", str(tmp_path / "missing.gguf"),
                 "--passages", "1", "--passage-tokens", "10", "--new-tokens", "2", "--repeats", "1"]) != 0
    assert "llama.cpp could not load" in capsys.readouterr().err


@pytest.mark.skipif(not DATA.is_file(), reason=f"needs the project's shared data ({DATA})")
def test_decode_benchmark_sets_four_bit_decoding_beside_dense(smollm, tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "computes_bf16", lambda device: True)  # bf16, where 'auto' makes copies
    folder = tmp_path / "four-bit-model"
    model = on_grid(tiny_model("llama"))  # as a Q4_1 checkpoint: decode steps read four-bit copies
    model.config.max_position_embeddings = 2048
    model.save_pretrained(folder)
    smollm.tokenizer.save_pretrained(folder)
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--model", str(folder), "--contexts", "300", "--new-tokens", "4",
                 "--rounds", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["four_bit_projections"] == 15
    rows = result["results"][0]["strategies"]
    assert set(rows) == {"full", "full_dense", "recycled_stride", "recycled_dynamic", "streaming"}
    assert rows["full"]["speedup"] == 1 and rows["full_dense"]["ms_per_token"] > 0
    assert 0 <= rows["full_dense"]["top1_agreement"] <= 1 and rows["full_dense"]["mean_kl"] >= 0
    # Taking turns one step each, in rotated orders over two rounds, changes timings only: every strategy's
    # logits, and so the answer and each agreement column, are the same as with whole answers in turn.
    assert main(["bench", "decode", "--model", str(folder), "--contexts", "300", "--new-tokens", "4",
                 "--rounds", "2", "--turns", "step", "--json", str(out)]) == 0
    stepwise = json.loads(out.read_text())
    assert result["turns"] == "answer" and stepwise["turns"] == "step"
    assert stepwise["results"][0]["prompts"][0]["answer"] == result["results"][0]["prompts"][0]["answer"]
    for name, row in stepwise["results"][0]["strategies"].items():
        assert {k: row.get(k) for k in ("top1_agreement", "mean_kl", "full_step_share")} == \
            {k: rows[name].get(k) for k in ("top1_agreement", "mean_kl", "full_step_share")}


def test_answer_benchmark_skips_llama_cpp_for_a_model_that_is_no_gguf(tiny_folder, tmp_path):
    out = tmp_path / "answer.json"
    assert main(["bench", "answer", "--model", str(tiny_folder), "--passages", "1", "--passage-tokens", "10",
                 "--new-tokens", "2", "--repeats", "1", "--json", str(out)]) == 0
    assert "is not a GGUF file; pass --gguf" in json.loads(out.read_text())["llama_cpp_skipped"]


def test_structured_benchmark_runs_at_a_tiny_size(tiny_folder, tmp_path):
    pytest.importorskip("llguidance", reason='needs pip install "blockrag[structured]"')
    import jsonschema

    from blockrag.benchmarks.structured import SCHEMA

    out = tmp_path / "structured.json"
    assert main(["bench", "structured", "--model", str(tiny_folder), "--new-tokens", "64", "--rounds", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["unconstrained"]["tokens"] == 64  # a random model never ends on its own
    jsonschema.validate(json.loads(result["constrained"]["text"]), SCHEMA)  # closed within the budget
    assert result["constrained"]["tokens_per_s"] > 0 and result["unconstrained"]["tokens_per_s"] > 0
    assert 0 < result["mask_ms_per_token"] and result["llguidance"] and result["machine"]["versions"]["torch"]


def test_serve_benchmark_runs_at_a_tiny_size(tiny_folder, tmp_path):
    pytest.importorskip("fastapi", reason='needs pip install "blockrag[serve]"')
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--model", str(tiny_folder), "--concurrency", "1,2", "--requests-per-client", "1",
                 "--passages", "2", "--max-tokens", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["concurrency"], r["mode"]): r for r in result["results"]}
    assert set(rows) == {(1, "block"), (1, "full"), (2, "block"), (2, "full")}
    assert all(r["requests"] == r["concurrency"] and r["ttft_p95_s"] >= r["ttft_p50_s"] > 0 for r in rows.values())
    assert all(rows[c, "block"]["mean_cached_tokens"] > 0 == rows[c, "full"]["mean_cached_tokens"] for c in (1, 2))
    assert set(result["block_over_full_ttft_p95"]) == {"1", "2"}
