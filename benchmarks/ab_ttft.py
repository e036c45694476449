"""Block TTFT and the question alone at 2K and 8K, bf16: run with two checkouts' interpreters in turn to compare them."""
import time, torch, sys, json
from blockrag.engine import BlockEngine, encode_blocks
from blockrag.engine.bench_ttft import QUESTION
e = BlockEngine.from_pretrained("smollm2-135m", dtype="bfloat16")
past = e.block_context()
g = torch.Generator().manual_seed(0)
out = {}
for target in (2048, 8000):
    n = round((target - len(past) - 60) / 200)
    ids = torch.randint(1000, 40000, (n, 200), generator=g).tolist()
    blocks = encode_blocks(e.model, ids, past, batch_size=8)
    for mode, bl in (("block", blocks), ("none", [])):
        ts = []
        for _ in range(5):
            ts.append(e.generate(None, bl, QUESTION, mode="block", max_new_tokens=1).ttft_s)
        out[f"{target}-{mode}"] = round(min(ts), 4)
print(json.dumps(out))
