#!/usr/bin/env python3
"""The reference side of the model benchmarks: transformers (PyTorch, CPU) on the same checkpoint,
same prompt length, same number of greedy decode steps, same thread count. Prints one JSON line
per dtype: load time, prefill and decode tokens/s, peak and steady (after the run) RSS.

Usage: transformers_bench.py CHECKPOINT PROMPT_TOKENS DECODE_TOKENS THREADS DTYPES (e.g. f32,bf16)
"""

import gc
import json
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM

path, prompt_len, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}
torch.set_num_threads(threads)


def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))


for name in sys.argv[5].split(","):
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtypes[name]).eval()
    load_s = time.perf_counter() - t
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        t = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"dtype": name, "load_s": load_s, "prefill_tps": prompt_len / prefill_s,
                      "decode_tps": steps / decode_s, "peak_rss": peak, "steady_rss": rss()}), flush=True)
    del model, cache, out
    gc.collect()
