#!/usr/bin/env python3
"""The reference side of the model benchmarks: transformers (PyTorch, CPU) on the same checkpoint,
same prompt length, same number of greedy decode steps, same thread count. Prints one JSON line
per dtype: load time, prefill and decode tokens/s, peak and steady (after the run) RSS.

With DEPTH > 0, also `deep_decode_tps`: DECODE_TOKENS greedy steps after a DEPTH-token prompt;
with STREAMS > 1, also `streams_decode_tps`: STREAMS prompts of PROMPT_TOKENS in one batch, then
DECODE_TOKENS steps for all of them (tokens of all streams per second of decoding).

Usage: transformers_bench.py CHECKPOINT PROMPT_TOKENS DECODE_TOKENS THREADS DTYPES [DEPTH STREAMS]
"""

import gc
import json
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM

path, prompt_len, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
depth = int(sys.argv[6]) if len(sys.argv) > 6 else 0
streams = int(sys.argv[7]) if len(sys.argv) > 7 else 1
dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}
torch.set_num_threads(threads)


def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))


def decode_rate(model, batch, length):
    """Greedy decode tokens per second (all rows) after a `batch` × `length` random prompt."""
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return batch * steps / (time.perf_counter() - t)


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
    steady, peak = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"dtype": name, "load_s": load_s, "prefill_tps": prompt_len / prefill_s,
           "decode_tps": steps / decode_s, "peak_rss": peak, "steady_rss": steady}
    if depth > 0:
        row["deep_decode_tps"] = decode_rate(model, 1, depth)
    if streams > 1:
        row["streams_decode_tps"] = decode_rate(model, streams, prompt_len)
    print(json.dumps(row), flush=True)
    del model, cache, out
    gc.collect()
