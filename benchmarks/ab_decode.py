"""Full decoding ms/token at 2K and 8K after a block prefill: run with two checkouts' interpreters in turn to compare them."""
import time, torch, sys, json
from blockrag.engine import BlockEngine, encode_blocks, DecodeOptions, start_decoding
from blockrag.engine.bench_ttft import QUESTION
e = BlockEngine.from_pretrained("smollm2-135m", dtype=sys.argv[1] if len(sys.argv) > 1 else "bfloat16")
past = e.block_context()
g = torch.Generator().manual_seed(0)
out = {}
with torch.inference_mode():
    for target in (2048, 8000):
        n = round((target - len(past) - 60) / 200)
        ids = torch.randint(1000, 40000, (n, 200), generator=g).tolist()
        blocks = encode_blocks(e.model, ids, past, batch_size=8)
        best = 9e9
        for rep in range(2):
            try:
                done = e._rag_prefill(None, blocks, QUESTION, "block", None, new_tokens=40)
            except TypeError:
                done = e._rag_prefill(None, blocks, QUESTION, "block", None)
            d = start_decoding(e.model, done.cache, DecodeOptions("full"), 40)
            d.step(100)
            t = time.perf_counter()
            for i in range(32): d.step(200 + i)
            best = min(best, (time.perf_counter() - t) / 32 * 1000)
        out[f"{target}-ms/token"] = round(best, 1)
print(json.dumps(out))
