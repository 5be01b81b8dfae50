"""The GRPO update on a GPU: tokens per second and model FLOPs utilisation, shared prefix on and off.

    python bench/update_mfu.py [--out runs/bench/mfu] [--size 3b] [--prompts 4] [--group 8]
        [--new-tokens 256] [--image-size 448] [--micro-batch 8] [--steps 3] [--peak-tflops X]

A randomly initialised model of Qwen2.5-VL-3B's shape (36 layers of 2048, 16 heads and 2 KV heads,
151,936-token vocabulary, the 32-block vision tower; `--size small` for a quick check anywhere),
trained as `observe_r1_3b.yaml` trains it: bf16 under DeepSpeed ZeRO-2, gradient checkpointing, the
AdamW of train/engine.py. One update phase is what `GRPOTrainer._update` does for a step:
`--prompts` prompts (a `--image-size` px image and a question) x `--group` responses of
`--new-tokens` tokens (random tokens: the update's cost does not depend on what they say), in
micro-batches of `--micro-batch` responses, PPO-clip loss, one optimizer step. It is timed
`--steps` times after a warm-up, with `optim.shared_prefix` on and off, on the same batch.

Reported per variant: seconds per update, response tokens per second, sequence tokens per second
(prompt + response of every response, the per-sample work, so both variants count the same
tokens), peak GPU memory, and model FLOPs utilisation: the FLOPs that variant's model computation
needs (forward and backward, 6 x parameters per token for the matrices that see the token, the
attention scores and values for the keys each query sees, the vision tower on every patch; the
recomputation of gradient checkpointing is not counted, as MFU has it) over time x peak. The
rollout is left out: it is the same code either way.

Writes `results.json` into `--out` and prints it. Needs the `train` extra on a CUDA torch (the
container image's /opt/venv has it); about 3 minutes on one H100-class GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from observe_r1.io import atomic_write_text  # noqa: E402

# Qwen2.5-VL-3B-Instruct's config.json (Hugging Face), the shapes that set the cost.
QWEN25_VL_3B = {
    "text": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151936, mrope_section=[16, 24, 24], tie_word_embeddings=True),
    "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                   fullatt_block_indexes=[7, 15, 23, 31], window_size=112),
}  # fmt: skip
# Dense bf16 tensor-core peaks (vendor data sheets, TFLOP/s), matched against the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "mfu")
    p.add_argument("--size", choices=["3b", "small"], default="3b")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, help="the device's peak; default from its name")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, folder: Path, device: torch.device):
    """The policy (fp32 weights, which DeepSpeed casts to bf16, as train/runner.py loads it) and its
    processor: the small model's folder for the tokenizer and image processor, the 3B shape for the
    weights. Token ids of the small tokenizer all lie inside the 3B vocabulary."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from observe_r1 import tiny_model
    from observe_r1.modeling import load_model, load_processor

    if not (folder / "config.json").is_file():
        tiny_model.build(folder, size="small", seed=0, overwrite=True)
    processor = load_processor(folder, max_pixels=args.image_size**2)
    if args.size == "small":
        model = load_model(folder).to(device)
    else:
        small = load_model(folder).config
        text = {
            k: v for k, v in QWEN25_VL_3B["text"].items() if k not in ("mrope_section", "tie_word_embeddings")
        }
        rope = {
            "rope_type": "default",
            "mrope_section": QWEN25_VL_3B["text"]["mrope_section"],
            "rope_theta": 1e6,
        }
        ids = {k: getattr(small.text_config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        config = Qwen2_5_VLConfig(
            text_config={**text, **ids, "rope_parameters": rope, "max_position_embeddings": 32768},
            vision_config=QWEN25_VL_3B["vision"],
            tie_word_embeddings=QWEN25_VL_3B["text"]["tie_word_embeddings"],
            **{k: getattr(small, k) for k in ("image_token_id", "video_token_id")},
            vision_start_token_id=small.vision_start_token_id,
            vision_end_token_id=small.vision_end_token_id,
        )
        with device:
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train(), processor


def make_batch(args: argparse.Namespace, processor):
    """The step's rollout as the trainer holds it: P prompts with a synthetic image each, G responses
    of `--new-tokens` random tokens each (no end-of-turn token, as a response cut at the limit)."""
    from observe_r1 import synth
    from observe_r1.data import load_samples
    from observe_r1.format import SYSTEM_PROMPT
    from observe_r1_train.rollout import RolloutBatch, process_prompt

    data = args.out / f"data-{args.image_size}px"
    if not (data / "data.jsonl").is_file():
        synth.generate(
            data, n=args.prompts, seed=0, image_size=args.image_size, overwrite=True, progress=False
        )
    samples = load_samples(data / "data.jsonl")[: args.prompts]
    prompts = [process_prompt(processor, s, s.question, SYSTEM_PROMPT) for s in samples]
    n, t = args.prompts * args.group, args.new_tokens
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, processor.tokenizer.pad_token_id, (n, t), generator=generator)
    mask = torch.ones(n, t, dtype=torch.long)
    pad = processor.tokenizer.pad_token_id
    return RolloutBatch(samples, prompts, args.group, ids, mask, [""] * n, ["length"] * n, pad, {})


def model_flops(model, batch, micro_batches: list[list[int]], shared: bool) -> float:
    """FLOPs of one update's forward and backward (3 x the forward's 2 x multiply-adds), without the
    recomputation of gradient checkpointing.

    Per language-model token: 6 x the decoder layers' parameters; the output layer only where logits
    are kept (the response tokens); attention 12 x layers x heads x head_dim per (query, key) pair it
    computes (QK^T and AV, forward and backward); the vision tower 6 x its parameters per patch, once
    per distinct prompt of a micro-batch. Pairs: a per-sample row of prompt length p and response
    length t has (p + t)(p + t + 1) / 2; a shared-prefix row p(p + 1) / 2 for the prompt plus
    t x p + t(t + 1) / 2 per response.
    """
    lm = model.model.language_model
    layer_params = sum(p.numel() for p in lm.layers.parameters())
    text = model.config.text_config
    attention_width = (
        text.num_hidden_layers * text.num_attention_heads * (text.hidden_size // text.num_attention_heads)
    )
    vision_params = sum(p.numel() for p in model.model.visual.parameters())
    head = text.hidden_size * text.vocab_size
    t = batch.completion_ids.shape[1]
    tokens = pairs = patches = 0
    for rows in micro_batches:
        prompts = sorted({r // batch.group_size for r in rows})
        for p in prompts:
            inputs = batch.prompt_inputs[p]
            length = inputs["input_ids"].shape[1]
            responses = sum(r // batch.group_size == p for r in rows)
            patches += int(inputs["image_grid_thw"].prod(-1).sum()) if "image_grid_thw" in inputs else 0
            if shared:
                tokens += length + responses * t
                pairs += length * (length + 1) // 2 + responses * (t * length + t * (t + 1) // 2)
            else:
                tokens += responses * (length + t)
                pairs += responses * (length + t) * (length + t + 1) // 2
    responses = sum(len(rows) for rows in micro_batches)
    return (
        6 * layer_params * tokens
        + 6 * head * responses * t
        + 12 * attention_width * pairs
        + 6 * vision_params * patches
    )


def update(engine, batch, micro_batches: list[list[int]], shared: bool) -> None:
    """One update phase as `GRPOTrainer._update` runs it (PPO-clip, token-mean, on-policy)."""
    from observe_r1_train import algorithms

    model = engine.module
    advantages = torch.linspace(-1, 1, len(batch.texts))
    for rows in micro_batches:
        logits = batch.completion_logits(model, rows, shared_prefix=shared)
        logprobs = algorithms.token_logprobs(logits, batch.completion_ids[rows].to(logits.device))
        mask = batch.completion_mask[rows].to(logits.device)
        loss, _ = algorithms.policy_loss(
            logprobs,
            logprobs.detach(),
            advantages[rows].to(logits.device),
            mask,
            0.2,
            0.2,
            "token-mean",
            None,
        )
        engine.backward(loss)
        engine.step()


def main(argv=None) -> int:
    args = parse_args(argv)
    from observe_r1_train import shared_prefix
    from observe_r1_train.engine import deepspeed_config, init_distributed, initialize, make_optimizer

    args.out.mkdir(parents=True, exist_ok=True)
    init_distributed()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    model, processor = build_model(args, args.out / "small-model", device)
    shared_prefix.install(model)
    batch = make_batch(args, processor)
    n = len(batch.texts)
    micro_batches = [list(range(i, min(i + args.micro_batch, n))) for i in range(0, n, args.micro_batch)]
    config = deepspeed_config(
        train_batch=n,
        micro_batch=args.micro_batch,
        grad_accumulation=len(micro_batches),
        zero_stage=2,
        bf16=args.dtype == "bf16",
        grad_clip=1.0,
    )
    optimizer = make_optimizer(
        model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0, offload=False
    )
    engine = initialize(model, config, optimizer)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    results = {
        "device": name,
        "peak_tflops": peak,
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompt_tokens": [p["input_ids"].shape[1] for p in batch.prompt_inputs],
        "variants": {},
    }
    sequence_tokens = sum(
        batch.prompt_inputs[r // args.group]["input_ids"].shape[1] + args.new_tokens for r in range(n)
    )
    for shared in (True, False):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        update(engine, batch, micro_batches, shared)  # warm-up (kernels, allocator, optimizer state)
        seconds = []
        for _ in range(args.steps):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            update(engine, batch, micro_batches, shared)
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
        s = statistics.median(seconds)
        flops = model_flops(model, batch, micro_batches, shared)
        results["variants"]["shared_prefix" if shared else "per_sample"] = {
            "update_seconds": seconds,
            "median_update_seconds": s,
            "response_tokens_per_second": n * args.new_tokens / s,
            "sequence_tokens_per_second": sequence_tokens / s,
            "model_tflops": flops / 1e12,
            "achieved_tflops_per_second": flops / s / 1e12,
            "mfu": flops / s / 1e12 / peak if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        }
    v = results["variants"]
    results["update_speedup"] = (
        v["per_sample"]["median_update_seconds"] / v["shared_prefix"]["median_update_seconds"]
    )
    text = json.dumps(results, indent=2)
    atomic_write_text(args.out / "results.json", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
