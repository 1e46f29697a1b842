#!/usr/bin/env python3
"""The reference side of the scoring benchmark (plugins/qwen3-4b-instruct-2507/benches/scoring.rs):
transformers (PyTorch, CPU) on the same checkpoint, prompt length and thread count. Per dtype, the
fastest of ROUNDS runs of a forward pass keeping the last row's logits (`prefill_tps`), and of one
keeping every row's, reduced as a scoring server does (`scoring_tps`): each prompt token's
log-probability, its rank (tokens at least as likely, itself included, vLLM's) and the TOP best.
Prints one JSON line per dtype.

Usage: transformers_scoring.py CHECKPOINT PROMPT_TOKENS THREADS DTYPES TOP ROUNDS
"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

path, prompt_len, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
top, rounds = int(sys.argv[5]), int(sys.argv[6])
dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}
torch.set_num_threads(threads)


def fastest(run):
    best = float("inf")
    for r in range(rounds):
        ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(r))
        t = time.perf_counter()
        run(ids)
        best = min(best, time.perf_counter() - t)
    return best


def prefill(ids):
    model(ids, use_cache=True, logits_to_keep=1)


def scoring(ids):
    logits = model(ids, use_cache=True).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, ids[0, 1:, None])
    rank = (logprobs >= chosen).sum(dim=-1)
    best = logprobs.topk(top, dim=-1)
    return chosen, rank, best


for name in sys.argv[4].split(","):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtypes[name]).eval()
    with torch.inference_mode():
        prefill(torch.zeros((1, 8), dtype=torch.long))  # warm-up
        row = {"dtype": name, "prefill_tps": prompt_len / fastest(prefill),
               "scoring_tps": prompt_len / fastest(scoring)}
    print(json.dumps(row), flush=True)
    del model
