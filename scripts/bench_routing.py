"""Forward time of a DAMC-composed model with 1, 2 and 4 modality adapters on one image-only input.

The goal: adapters of modalities absent from the input cost nothing (4 adapters <= 1.2x the time
of 1). Every configuration uses the same LLM, the same image tower and the same input; only the
number of composed modalities (each with a text LoRA merged linearly and a modality LoRA) changes.

    .venv/bin/python scripts/bench_routing.py [--hidden 512 --layers 8 --rank 32 --repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from mcomp.lora import LoraSpec
from mcomp.model import MultimodalLM
from mcomp.tiny import (
    build_llm,
    build_tokenizer,
    tiny_audio_adapter_config,
    tiny_image_adapter_config,
    tiny_point_adapter_config,
    tiny_video_adapter_config,
)


def composed(tokenizer, llm_kwargs, n_modalities: int, rank: int) -> MultimodalLM:
    image = tiny_image_adapter_config(
        tower_config={
            "embed_dim": 64,
            "vision_cfg": {"image_size": 96, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4},
        }
    )
    configs = [image, tiny_audio_adapter_config(), tiny_video_adapter_config(), tiny_point_adapter_config()][
        :n_modalities
    ]
    model = MultimodalLM.build(build_llm(tokenizer, seed=0, **llm_kwargs), tokenizer, configs)
    spec = LoraSpec(r=rank, alpha=2 * rank)
    routes = {"text": []}
    for k, m in enumerate(model.modalities):
        model.add_lora(spec, name=f"text-{m}", seed=10 + k, zero_b=False)
        model.add_lora(spec, name=m, seed=20 + k, zero_b=False)
        routes["text"].append((f"text-{m}", 1.0 / n_modalities))
        routes[m] = [(m, 1.0)]
    model.set_routes(routes)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    llm_kwargs = dict(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
    )
    image = "examples/red_circle.png"
    Image.open(image).load()
    models, inputs = {}, {}
    for n in (1, 2, 4):
        models[n] = composed(tokenizer, llm_kwargs, n, args.rank)
        prompt = models[n].template.prompt(
            "image: <image>\nWhat shape is in the image, and what colour is it? Answer briefly."
        )
        inputs[n] = models[n].prepare_inputs([prompt], [{"image": image}])
    times = {n: [] for n in models}
    with torch.no_grad():
        for n in models:  # warm-up
            models[n](inputs[n])
        for _ in range(args.repeats):  # round-robin, so background load hits every configuration alike
            for n in models:
                t0 = time.perf_counter()
                models[n](inputs[n])
                times[n].append(time.perf_counter() - t0)
    rows = [
        (n, inputs[n].inputs_embeds.shape[1], int((inputs[n].modality_ids == -1).sum()), statistics.median(times[n]))
        for n in models
    ]
    base = rows[0][3]
    print(
        f"LLM hidden {args.hidden}, {args.layers} layers, LoRA rank {args.rank}, {args.threads} threads, "
        f"median of {args.repeats} forwards, image-only input"
    )
    print(f"{'adapters':>8} {'positions':>9} {'text':>5} {'forward ms':>11} {'ratio vs 1':>10}")
    for n, positions, text, t in rows:
        print(f"{n:>8} {positions:>9} {text:>5} {t * 1000:>11.1f} {t / base:>10.3f}")


if __name__ == "__main__":
    main()
