#!/usr/bin/env python3
"""Writes a random-weight checkpoint (bf16, as the real ones ship) in a real model's shape, for the
benchmarks (not committed: generated on first use).

Usage: make_checkpoint.py OUT_DIR qwen3-0.6b
       make_checkpoint.py OUT_DIR qwen3-4b               (Qwen3-4B-Instruct-2507's shape: the GPU bench)
       make_checkpoint.py OUT_DIR qwen3-30b-a3b LAYERS   (the real widths and 128 experts, fewer layers)
       make_checkpoint.py OUT_DIR glm-4.7-flash LAYERS   (the real widths and 64 experts, fewer layers;
                                                          the GLM fixture's tokenizer and template)
       make_checkpoint.py OUT_DIR qwen3-vl-2b            (Qwen3-VL-2B-Instruct: all 28 text layers and
                                                          the 24-block vision tower; the Qwen3-VL
                                                          fixture's tokenizer and template, the real
                                                          preprocessor budget, and two bench images,
                                                          bench-448x448.png and bench-1280x720.png)

Every file written is mode 0644.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers import (
    Glm4MoeLiteConfig,
    Glm4MoeLiteForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
GLM_FIXTURE = FIXTURES / "glm4-moe-lite-tiny"
VL_FIXTURE = FIXTURES / "qwen3-vl-tiny"
# (width, height) of the images saved beside the Qwen3-VL checkpoint.
VL_BENCH_IMAGES = [(448, 448), (1280, 720)]


def photo(rng, width, height):
    """A photo-like RGB image: the fixtures' own pattern (tests/fixtures/qwen3_vl.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))
    from qwen3_vl import _photo

    return PIL.Image.fromarray(_photo(rng, width, height), "RGB")


out, shape = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
# Initialising in bf16 keeps the 30B-shaped model's peak memory at its size.
torch.set_default_dtype(torch.bfloat16)
# PIO_CHECKPOINT_DEVICE=cuda draws the weights on a GPU: seconds, where the 4B shape takes a minute
# or more on CPUs (tests/gpu/check.sh).
torch.set_default_device(os.environ.get("PIO_CHECKPOINT_DEVICE", "cpu"))
# The dense Qwen3 shapes: what differs between their config.json files.
DENSE = {
    # hidden 1024, 28 layers, 16/8 heads, intermediate 3072
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, max_position_embeddings=40960, rope_theta=1_000_000.0),
    # Qwen3-4B-Instruct-2507: hidden 2560, 36 layers, 32/8 heads, intermediate 9728
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, max_position_embeddings=262144, rope_theta=5_000_000.0),
}
if shape in DENSE:
    config = Qwen3Config(
        vocab_size=151936,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
        **DENSE[shape],
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
elif shape == "glm-4.7-flash":
    # zai-org/GLM-4.7-Flash's config.json, with `LAYERS` of its 47 layers (the first dense) and
    # no next-token-prediction layer.
    config = Glm4MoeLiteConfig(
        vocab_size=154880,
        hidden_size=2048,
        intermediate_size=10240,
        moe_intermediate_size=1536,
        num_hidden_layers=int(sys.argv[3]),
        num_attention_heads=20,
        num_key_value_heads=20,
        q_lora_rank=768,
        kv_lora_rank=512,
        qk_nope_head_dim=192,
        qk_rope_head_dim=64,
        v_head_dim=256,
        n_routed_experts=64,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.8,
        norm_topk_prob=True,
        max_position_embeddings=202752,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        eos_token_id=[0, 7, 9],
        pad_token_id=0,
        torch_dtype="bfloat16",
    )
    model = Glm4MoeLiteForCausalLM(config)
elif shape == "qwen3-vl-2b":
    # Qwen/Qwen3-VL-2B-Instruct's config.json (all layers), in transformers 5's form
    # (`rope_parameters`), with the special-token ids of the Qwen3-VL fixture's tokenizer, which the
    # engines need to start (token ids only name rows here).
    tiny = json.loads((VL_FIXTURE / "config.json").read_text())
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 262144,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_interleaved": True,
                "mrope_section": [24, 20, 20],
            },
            "attention_bias": False,
            "tie_word_embeddings": True,
            "bos_token_id": tiny["text_config"]["bos_token_id"],
            "eos_token_id": tiny["text_config"]["eos_token_id"],
            "pad_token_id": tiny["text_config"]["pad_token_id"],
            "dtype": "bfloat16",
        },
        vision_config={
            "depth": 24,
            "hidden_size": 1024,
            "num_heads": 16,
            "intermediate_size": 4096,
            "hidden_act": "gelu_pytorch_tanh",
            "in_channels": 3,
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": 2048,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [5, 11, 17],
            "dtype": "bfloat16",
        },
        image_token_id=tiny["image_token_id"],
        video_token_id=tiny["video_token_id"],
        vision_start_token_id=tiny["vision_start_token_id"],
        vision_end_token_id=tiny["vision_end_token_id"],
        tie_word_embeddings=True,
        dtype="bfloat16",
    )
    model = Qwen3VLForConditionalGeneration(config)
else:
    sys.exit(f"unknown shape {shape}")
model = model.to(torch.bfloat16)
for module in model.modules():
    if hasattr(module, "e_score_correction_bias"):
        # Kept in f32, as the real checkpoint stores it (`_keep_in_fp32_modules_strict`).
        module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
model.save_pretrained(out, safe_serialization=True)
if shape == "glm-4.7-flash":
    # The config in the real file's form (llama.cpp's converter reads `first_k_dense_replace`).
    path = Path(out) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("mlp_layer_types", None)
    cfg.update(first_k_dense_replace=1, num_nextn_predict_layers=0, topk_method="noaux_tc")
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # Token ids only name rows here; the engines need a tokenizer to start.
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(GLM_FIXTURE / name, Path(out) / name)
if shape == "qwen3-vl-2b":
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(VL_FIXTURE / name, Path(out) / name)
    # The fixture's preprocessor_config.json with the real checkpoint's pixel budget.
    pre = json.loads((VL_FIXTURE / "preprocessor_config.json").read_text())
    pre["size"] = {"shortest_edge": 65536, "longest_edge": 16777216}
    (Path(out) / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True) + "\n")
    rng = np.random.RandomState(0)
    for width, height in VL_BENCH_IMAGES:
        photo(rng, width, height).save(Path(out) / f"bench-{width}x{height}.png")
for path in Path(out).iterdir():
    if path.is_file():
        path.chmod(0o644)
