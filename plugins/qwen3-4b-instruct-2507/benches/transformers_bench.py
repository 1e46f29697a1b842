#!/usr/bin/env python3
"""The reference side of the Qwen3 benchmark: transformers (PyTorch, CPU) on the same checkpoint,
same prompt length, same number of decode steps, same thread count. Prints one JSON line per dtype.
Usage: transformers_bench.py CHECKPOINT PROMPT_TOKENS DECODE_TOKENS THREADS"""

import json
import resource
import sys
import time

import torch
from transformers import Qwen3ForCausalLM

path, prompt_len, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
for name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
    t = time.perf_counter()
    model = Qwen3ForCausalLM.from_pretrained(path, dtype=dtype).eval()
    load_s = time.perf_counter() - t
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        t = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - t
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"dtype": name, "load_s": load_s, "prefill_tps": prompt_len / prefill_s,
                      "decode_tps": steps / decode_s, "peak_rss": peak}), flush=True)
    del model, cache, out
