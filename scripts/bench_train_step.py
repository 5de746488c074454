#!/usr/bin/env python
"""Time of a training step (forward + backward) with the plain forward against the shared-prefix
forward (`MultimodalLM.forward(..., share_prefix=True)`: the batch's common system prompt runs once,
logits only from the first answer token), side by side on the same model and batches. With
`--decoupled` (DAMC: text and image tokens through their own LoRA), two plain-LoRA twins (same seed,
same batches) run interleaved with it: one with DAMC's learnable modality tokens around each image
(so its sequences are DAMC's, token for token: the ratio to it is what routing the tokens costs),
and the NaiveMC recipe itself (no modality tokens: the ratio to it adds the cost of DAMC's longer
sequences).

    .venv/bin/python scripts/bench_train_step.py [--hidden 128] [--layers 4] [--batch 16] [--decoupled]

The model is a small random Llama (the demo zoo's width and depth by default) with the tiny image
adapter and stage-2 LoRA. The batches are image questions in the world's styles (open, four
options, caption), rendered in the vicuna template. Encoder features are cached on disk after a
warm-up pass, so the timings compare LLM work. Both paths must give the same losses (checked); the
script exits non-zero if they differ.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_loglik import build_model  # scripts/: a small random Llama with tiny adapters
from PIL import Image

COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "cross", "ring", "star"]


def make_samples(root: Path, n: int, seed: int) -> list[tuple[list[dict], dict]]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
        kind = i % 3
        if kind == 0:
            question, answer = "What colour is the object in the image?", colour
        elif kind == 1:
            options = "\n".join(
                f"{letter}. {c}" for letter, c in zip("ABCD", rng.permutation(COLOURS)[:3].tolist() + [colour])
            )
            question, answer = (
                f"What colour is the object in the image?\n{options}\nAnswer with the option's text.",
                colour,
            )
        else:
            question, answer = "Describe the image.", f"a {colour} {shape}"
        samples.append(
            (
                [{"from": "human", "value": f"image: <image>\n{question}"}, {"from": "gpt", "value": answer}],
                {"image": str(path)},
            )
        )
    return samples


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds over the batches (medians are reported)")
    ap.add_argument("--decoupled", action="store_true", help="DAMC: text and image LoRA routed per token")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mcomp.feature_cache import FeatureCache
    from mcomp.train import TrainConfig, prepare_for_training

    def trained(decoupled: bool, modality_tokens: bool = False):
        model = build_model(args.hidden, args.layers, args.seed, modalities=("image",))
        config = TrainConfig(stage=2, decoupled=decoupled, lora_r=8)
        prepare_for_training(model, config)
        if modality_tokens:  # DAMC's sequences without its routing: the same tokens, learnt the same way
            model.add_modality_tokens("image", config.prefix_tokens, config.suffix_tokens)
        return model

    model = trained(args.decoupled)
    twins = {}
    if args.decoupled:  # plain LoRA on the same batches
        twins = {"same sequences": trained(False, modality_tokens=True), "naivemc": trained(False)}
    with tempfile.TemporaryDirectory() as tmp:
        for m in (model, *twins.values()):
            m.feature_cache = FeatureCache(Path(tmp) / "features")
        samples = make_samples(Path(tmp), args.batch * args.batches, args.seed)
        batches = [samples[k : k + args.batch] for k in range(0, len(samples), args.batch)]

        def one_pass(m, share: bool) -> tuple[float, list[float]]:
            losses, start = [], time.perf_counter()
            for batch in batches:
                m.zero_grad()
                inputs = m.prepare_conversations([c for c, _ in batch], [x for _, x in batch])
                loss = m(inputs, share_prefix=share).loss
                loss.backward()
                losses.append(float(loss.detach()))
            return (time.perf_counter() - start) / len(batches), losses

        one_pass(model, False)  # warm-up: fills the feature cache
        for twin in twins.values():
            one_pass(twin, False)
        times: dict = {False: [], True: [], **{name: [] for name in twins}}
        losses = {}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every path
            for share in (False, True):
                seconds, losses[share] = one_pass(model, share)
                times[share].append(seconds)
            for name, twin in twins.items():
                times[name].append(one_pass(twin, False)[0])
        best = {k: statistics.median(v) for k, v in times.items() if v}
    mismatch = max(abs(a - b) / abs(a) for a, b in zip(losses[False], losses[True]))
    print(
        f"hidden {args.hidden}, {args.layers} layers, batch {args.batch}, "
        f"{'DAMC' if args.decoupled else 'plain'} LoRA, {args.threads} thread(s)"
    )
    print(f"plain forward:        {best[False]:.3f} s a step")
    print(f"shared-prefix forward: {best[True]:.3f} s a step  ({best[False] / best[True]:.2f}x)")
    print(f"largest relative loss difference: {mismatch:.1e}")
    if twins:
        print(
            f"plain LoRA, same sequences: {best['same sequences']:.3f} s a step  "
            f"(DAMC's routed step / plain LoRA's on the same tokens: {best[False] / best['same sequences']:.2f}x)"
        )
        print(
            f"NaiveMC recipe:        {best['naivemc']:.3f} s a step  "
            f"(DAMC's step / NaiveMC's, with DAMC's {TrainConfig.prefix_tokens}+{TrainConfig.suffix_tokens} "
            f"modality tokens per image: {best[False] / best['naivemc']:.2f}x)"
        )
    if mismatch > 1e-5:
        print("the two paths disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
