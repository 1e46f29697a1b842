#!/usr/bin/env python3
"""The reference side of the Qwen3-VL benchmark: transformers (PyTorch, CPU, bf16) on the same
checkpoint, images, prompt, greedy decode steps and thread count as PIO.

For each image, with the prompt [image, "Describe this image."] through the checkpoint's chat
template:
  preprocess_ms  load_image + the image processor alone (Qwen2VLImageProcessorPil: decode, resize,
                 rescale/normalize, patchify), median of 3 runs;
  vision_ms      the vision tower alone (model.model.visual on those pixel values, merger and
                 deepstack mergers included), median of 2 runs;
  ttft_ms        wall time from the processor call (apply_chat_template with tokenize: image load,
                 preprocessing, tokenization) to the first generated token of model.generate
                 (vision tower + prefill + first greedy pick);
  decode_tps     in that same greedy generate of DECODE_TOKENS + 1 tokens, DECODE_TOKENS divided by
                 the time between the first and the last token (each token is time-stamped by a
                 streamer as generate emits it; EOS is masked so that every run decodes them all).
Before the first image, one untimed warm-up (a 256x256 image, 2 generated tokens, and one vision
pass) so that one-time setup costs (lazy imports, kernel selection) land in no figure.

Prints one JSON line per image, then one line with load_s, peak_rss and rss (bytes).

Usage: transformers_vl_bench.py CHECKPOINT THREADS DECODE_TOKENS IMAGE...
"""

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import transformers
from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.generation.streamers import BaseStreamer
from transformers.image_utils import load_image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

PREPROCESS_RUNS = 3
VISION_RUNS = 2

path, threads, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
images = sys.argv[4:]
if not images:
    sys.exit(__doc__)
torch.set_num_threads(threads)
torch.manual_seed(0)
transformers.logging.set_verbosity_error()


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without its video processor (as tests/fixtures/qwen3_vl.py's):
    Qwen3VLVideoProcessor needs torchvision, which is not installed, and ProcessorMixin takes its
    sub-processors from the signature of `__init__`. Images and text go through Qwen3VLProcessor's
    own code unchanged."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template, **kwargs
        )


class TokenTimes(BaseStreamer):
    """Records the time at which generate emits each new token (the first `put` is the prompt)."""

    def __init__(self):
        self.prompt_seen, self.times = False, []

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))


def ms(seconds):
    return round(seconds * 1000.0, 3)


t = time.perf_counter()
model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
load_s = time.perf_counter() - t
processor = ImageOnlyQwen3VLProcessor(
    image_processor=Qwen2VLImageProcessorPil.from_pretrained(path),
    tokenizer=AutoTokenizer.from_pretrained(path),
)
processor.chat_template = processor.tokenizer.chat_template
image_token_id = model.config.image_token_id


def messages(image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe this image."}]}]


def generate(image, new_tokens):
    """apply_chat_template + greedy generate; returns (inputs, seconds to the first token, token times)."""
    streamer = TokenTimes()
    start = time.perf_counter()
    inputs = processor.apply_chat_template(
        messages(image), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    out = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # EOS masked: every run decodes the same number of tokens
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        streamer=streamer,
    )
    assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens == len(streamer.times)
    return inputs, streamer.times[0] - start, streamer.times


def vision(pixel_values, grid):
    start = time.perf_counter()
    model.model.visual(pixel_values, grid_thw=grid)
    return time.perf_counter() - start


with torch.inference_mode():
    # Warm-up (untimed): a 256x256 image (64 image tokens) through generate, and one vision pass.
    warm = PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (256, 256, 3), dtype=np.uint8), "RGB")
    generate(warm, 2)
    pre = processor.image_processor(warm, return_tensors="pt")
    vision(pre["pixel_values"].to(model.model.visual.dtype), pre["image_grid_thw"])

    for image_path in images:
        pre_s = []
        for _ in range(PREPROCESS_RUNS):
            start = time.perf_counter()
            image = load_image(image_path)
            pre = processor.image_processor(image, return_tensors="pt")
            pre_s.append(time.perf_counter() - start)
        pixels, grid = pre["pixel_values"].to(model.model.visual.dtype), pre["image_grid_thw"]
        vision_s = [vision(pixels, grid) for _ in range(VISION_RUNS)]
        inputs, ttft_s, times = generate(image_path, steps + 1)
        ids = inputs["input_ids"][0]
        assert torch.equal(inputs["image_grid_thw"], grid)
        print(
            f"{Path(image_path).name}: preprocess {[ms(s) for s in pre_s]} ms, vision {[ms(s) for s in vision_s]} ms, "
            f"token times {[ms(s - times[0]) for s in times]} ms",
            file=sys.stderr,
        )
        row = {
            "engine": "transformers",
            "image": Path(image_path).name,
            "width": image.width,
            "height": image.height,
            "grid": grid[0].tolist(),
            "image_tokens": int((ids == image_token_id).sum()),
            "prompt_tokens": int(ids.shape[0]),
            "preprocess_ms": ms(statistics.median(pre_s)),
            "vision_ms": ms(statistics.median(vision_s)),
            "ttft_ms": ms(ttft_s),
            "decode_tps": (len(times) - 1) / (times[-1] - times[0]),
        }
        print(json.dumps(row), flush=True)

print(
    json.dumps(
        {
            "engine": "transformers",
            "load_s": load_s,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss": rss(),
        }
    ),
    flush=True,
)
