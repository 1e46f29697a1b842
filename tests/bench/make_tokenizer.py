#!/usr/bin/env python3
"""Writes a Qwen3-sized tokenizer into a benchmark checkpoint (not committed: generated on use).

Usage: make_tokenizer.py CHECKPOINT_DIR

The real Qwen3 tokenizer cannot be downloaded here, and what a grammar costs per step grows with
the vocabulary, so a byte-level BPE of Qwen3's size (151,643 merges' worth of tokens, Qwen3's
pre-tokenizer pattern, its special and tool-call tokens at its ids) is trained on the text this
machine has: Python's standard library and installed packages (code, docstrings, docs). It
needs `pip install tokenizers`. The Qwen3 fixture's chat template and generation config go with
it. Every file written is mode 0644.
"""

import json
import shutil
import sys
import sysconfig
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

out = Path(sys.argv[1])
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "qwen3-tiny"
VOCAB = 151643
# Qwen3's added tokens, from id 151643 on (tokenizer_config.json of Qwen3-4B-Instruct-2507).
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
           "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
TEXT_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
               "<think>", "</think>"]
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus(limit=400 << 20):
    """Text files under the Python installation, up to `limit` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"]).parent
    total = 0
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".py", ".txt", ".md", ".rst", ".json", ".html") or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        total += len(text)
        yield text
        if total > limit:
            return


tokenizer = Tokenizer(models.BPE())
tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
])
tokenizer.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                              show_progress=False, min_frequency=2)
tokenizer.train_from_iterator(corpus(), trainer=trainer)
size = tokenizer.get_vocab_size()
if size < VOCAB:
    print(f"note: the corpus gave {size} tokens, fewer than Qwen3's {VOCAB}", file=sys.stderr)
tokenizer.add_special_tokens(SPECIAL)
tokenizer.add_tokens(TEXT_TOKENS)
out.mkdir(parents=True, exist_ok=True)
tokenizer.save(str(out / "tokenizer.json"))
for name in ("tokenizer_config.json", "generation_config.json"):
    shutil.copy(FIXTURE / name, out / name)
ids = {t: tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>")}
gen = json.loads((out / "generation_config.json").read_text())
gen.update(eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"])
(out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
for path in out.iterdir():
    if path.is_file():
        path.chmod(0o644)
print(f"{out}: {tokenizer.get_vocab_size()} tokens", file=sys.stderr)
