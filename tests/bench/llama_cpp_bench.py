#!/usr/bin/env python3
"""The llama.cpp side of the model benchmarks: llama-bench (CPU) on the same checkpoint, same prompt
length, same number of decode steps, same thread count. Prints one JSON line per dtype: prefill and
decode tokens/s (llama-bench's mean over its repetitions, after a warmup run).

Prefill is `-p PROMPT` on an empty cache; decode is `-n DECODE` with PROMPT tokens already in the
cache (`-d PROMPT`), as transformers_bench.py decodes after its prompt, and `decode0_tps` on an
empty cache; a dtype `KIND+kv8` runs KIND's weights with a Q8_0 KV cache (`-fa 1 -ctk q8_0 -ctv q8_0`). llama-bench feeds random
token ids and does not sample, so decode is the forward passes alone; everything else is its default
(an f16 KV cache, flash attention on auto).

The checkpoint is converted once per dtype with llama.cpp's own converter (the convert_hf_to_gguf.py
of the source tree LLAMA_BENCH was built from, found through its CMakeCache.txt), to
CHECKPOINT.DTYPE.gguf. A checkpoint without a tokenizer (the random ones) is given the small real
Qwen3 tokenizer of tests/fixtures/qwen3-tiny, which the converter pads to config's vocab_size, and
the converter's BPE pre-tokenizer check (a hash of how it tokenizes a test string, which so small a
vocabulary cannot match) is answered "qwen2", what real Qwen3 checkpoints get. The tokenizer only
names the token ids: the weights are the checkpoint's, unchanged for f32 and bf16. The converter
needs torch, transformers and sentencepiece.

q4_k_m is the bf16 file quantized by llama-quantize (beside LLAMA_BENCH), as users' Q4_K_M files
are made. With DEPTH > 0, also `deep_decode_tps` (`-d DEPTH`); with STREAMS > 1, also
`streams_decode_tps` from llama-batched-bench (beside LLAMA_BENCH): STREAMS sequences of
PROMPT_TOKENS, then DECODE_TOKENS each, generated tokens of all sequences per second.

Usage: llama_cpp_bench.py CHECKPOINT LLAMA_BENCH PROMPT_TOKENS DECODE_TOKENS THREADS DTYPES [DEPTH STREAMS]
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FIXTURE_TOKENIZER = Path(__file__).resolve().parent.parent / "fixtures" / "qwen3-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DTYPES = ("f32", "bf16", "q8_0", "q4_k_m")

# Runs the converter with its pre-tokenizer check answered (argv: source tree, converter arguments).
CONVERT_WITH_QWEN2_PRE = """
import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llama_cpp_source(bench):
    """The llama.cpp source tree `bench` was built from."""
    cache = Path(bench).resolve().parent.parent / "CMakeCache.txt"
    for line in cache.read_text().splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:"):
            return Path(line.split("=", 1)[1])
    sys.exit(f"no CMAKE_HOME_DIRECTORY in {cache}")


def convert(checkpoint, src, dtype, binary):
    """CHECKPOINT.DTYPE.gguf, converted unless a file newer than the checkpoint is already there."""
    out = Path(f"{checkpoint}.{dtype}.gguf")
    newest = max(f.stat().st_mtime for f in checkpoint.iterdir())
    if out.is_file() and out.stat().st_mtime >= newest:
        return out
    part = out.with_name(out.name + ".part")
    if dtype == "q4_k_m":
        bf16 = convert(checkpoint, src, "bf16", binary)
        quantize = Path(binary).resolve().parent / "llama-quantize"
        subprocess.run([str(quantize), str(bf16), str(part), "Q4_K_M"], check=True, stdout=sys.stderr, stderr=sys.stderr)
        os.replace(part, out)
        return out
    with tempfile.TemporaryDirectory() as tmp:
        if (checkpoint / "tokenizer.json").is_file():
            # A tiny tokenizer beside random weights cannot pass the pre-tokenizer check either.
            model, cmd = checkpoint, [sys.executable, "-c", CONVERT_WITH_QWEN2_PRE, str(src)]
        else:
            model = Path(tmp) / checkpoint.name  # the converter names the model after the folder
            model.mkdir()
            for f in checkpoint.iterdir():
                (model / f.name).symlink_to(f.resolve())
            for name in TOKENIZER_FILES:
                (model / name).write_bytes((FIXTURE_TOKENIZER / name).read_bytes())
            cmd = [sys.executable, "-c", CONVERT_WITH_QWEN2_PRE, str(src)]
        cmd += [str(model), "--outtype", dtype, "--outfile", str(part)]
        print(f"converting {checkpoint} to {out}...", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    os.replace(part, out)
    return out


def bench(binary, gguf, threads, args):
    """llama-bench's mean tokens/s for one test."""
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-o", "jsonl", *map(str, args)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["avg_ts"]


def batched(binary, gguf, threads, prompt, steps, streams):
    """llama-batched-bench's generated tokens per second over `streams` parallel sequences."""
    tool = Path(binary).resolve().parent / "llama-batched-bench"
    cmd = [str(tool), "-m", str(gguf), "-c", str(streams * (prompt + steps) + 16), "-b", "2048", "-ub", "512",
           "-npp", str(prompt), "-ntg", str(steps), "-npl", str(streams), "-t", str(threads), "-tb", str(threads),
           "--output-format", "jsonl"]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    return rows[-1]["speed_tg"]


def main():
    if len(sys.argv) not in (7, 9):
        sys.exit(__doc__)
    checkpoint, binary = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    prompt, steps, threads = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    depth, streams = (int(sys.argv[7]), int(sys.argv[8])) if len(sys.argv) == 9 else (0, 1)
    src = llama_cpp_source(binary)
    for dtype in sys.argv[6].split(","):
        # `KIND+kv8`: the same weights with an 8-bit (Q8_0) KV cache, which needs flash attention.
        weights, _, cache = dtype.partition("+")
        if weights not in DTYPES or cache not in ("", "kv8"):
            sys.exit(f"dtype {dtype!r}: one of {', '.join(DTYPES)}, optionally with +kv8")
        gguf = convert(checkpoint, src, weights, binary)
        kv = ["-fa", 1, "-ctk", "q8_0", "-ctv", "q8_0"] if cache else []
        row = {"dtype": dtype}
        row["prefill_tps"] = bench(binary, gguf, threads, ["-p", prompt, "-n", 0] + kv)
        row["decode_tps"] = bench(binary, gguf, threads, ["-p", 0, "-n", steps, "-d", prompt] + kv)
        row["decode0_tps"] = bench(binary, gguf, threads, ["-p", 0, "-n", steps] + kv)
        if depth > 0:
            row["deep_decode_tps"] = bench(binary, gguf, threads, ["-p", 0, "-n", steps, "-d", depth] + kv)
        if streams > 1:
            row["streams_decode_tps"] = batched(binary, gguf, threads, prompt, steps, streams)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
