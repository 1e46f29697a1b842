#!/usr/bin/env python3
"""Writes a Qwen3-0.6B-shaped checkpoint with random weights (bf16, as the real one ships) for the
benchmark: hidden 1024, 28 layers, 16/8 heads, head_dim 128, intermediate 3072, vocab 151936.
Usage: make_checkpoint.py OUT_DIR"""

import sys

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

out = sys.argv[1]
torch.manual_seed(0)
config = Qwen3Config(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    torch_dtype="bfloat16",
)
model = Qwen3ForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(out, safe_serialization=True)
