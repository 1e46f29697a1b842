#!/usr/bin/env python3
"""Writes a random-weight checkpoint (bf16, as the real ones ship) in a real model's shape, for the
benchmarks (not committed: generated on first use).

Usage: make_checkpoint.py OUT_DIR qwen3-0.6b
       make_checkpoint.py OUT_DIR qwen3-30b-a3b LAYERS   (the real widths and 128 experts, fewer layers)
"""

import sys

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

out, shape = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
# Initialising in bf16 keeps the 30B-shaped model's peak memory at its size.
torch.set_default_dtype(torch.bfloat16)
if shape == "qwen3-0.6b":
    # hidden 1024, 28 layers, 16/8 heads, head_dim 128, intermediate 3072, vocab 151936
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
    model = Qwen3ForCausalLM(config)
elif shape == "qwen3-30b-a3b":
    # Qwen3-Coder-30B-A3B-Instruct's config.json, with `LAYERS` of its 48 layers.
    config = Qwen3MoeConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=int(sys.argv[3]),
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=262144,
        rope_theta=10_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = Qwen3MoeForCausalLM(config)
else:
    sys.exit(f"unknown shape {shape}")
model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
