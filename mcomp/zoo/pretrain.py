"""Pretraining steps of the tiny zoo: the base LLM on the world's text, and each tiny encoder on
the world's media (attribute classification), after which the encoder is frozen for good."""
from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from mcomp.io import save_tensors

logger = logging.getLogger(__name__)


def pretrain_llm(model, conversations: list[list[dict]], sentences: list[str], steps: int, *, batch_size: int = 16,
                 learning_rate: float = 3e-3, seed: int = 0) -> list[float]:
    """Full-parameter causal-LM training of `model.llm` (a MultimodalLM without adapters): the loss
    covers the answers of text-only conversations and every token of plain sentences."""
    g = torch.Generator().manual_seed(seed)
    llm = model.llm
    llm.train()
    llm.requires_grad_(True)
    optimizer = torch.optim.AdamW(llm.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    tok = model.tokenizer
    losses = []
    for _ in tqdm(range(steps), desc="pretrain base LLM"):
        picks = torch.randint(len(conversations), (batch_size,), generator=g).tolist()
        loss = model(model.prepare_conversations([conversations[i] for i in picks])).loss
        if sentences:
            picks = torch.randint(len(sentences), (max(1, batch_size // 4),), generator=g).tolist()
            batch = tok([sentences[i] + tok.eos_token for i in picks], return_tensors="pt", padding=True)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = loss + llm(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    llm.requires_grad_(False)
    llm.eval()
    return losses


def pretrain_encoder(adapter, files: list[str], labels: list[tuple[int, int]], num_classes: tuple[int, int],
                     steps: int, out_path, *, batch_size: int = 16, learning_rate: float = 2e-3, seed: int = 0) -> dict:
    """Train `adapter.encoder` (with a throw-away linear head on mean-pooled features) to predict two
    attributes of each file; save its weights (safetensors) and return accuracy figures."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    inputs = adapter.prepare(files)  # decoded once; small at zoo sizes
    targets = torch.tensor(labels)
    encoder = adapter.encoder
    head = nn.Linear(adapter.encoder_dim, sum(num_classes))
    encoder.requires_grad_(True)
    encoder.train()
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    split = num_classes[0]
    for _ in tqdm(range(steps), desc=f"pretrain {adapter.modality} encoder"):
        idx = torch.randint(len(files), (batch_size,), generator=g)
        logits = head(adapter.encode(inputs[idx]).mean(dim=1))
        loss = nn.functional.cross_entropy(logits[:, :split], targets[idx, 0]) + \
            nn.functional.cross_entropy(logits[:, split:], targets[idx, 1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    encoder.requires_grad_(False)
    encoder.eval()
    with torch.no_grad():
        logits = torch.cat([head(adapter.encode(inputs[i:i + 64]).mean(dim=1)) for i in range(0, len(files), 64)])
    accuracy = [float((logits[:, :split].argmax(-1) == targets[:, 0]).float().mean()),
                float((logits[:, split:].argmax(-1) == targets[:, 1]).float().mean())]
    save_tensors(dict(encoder.state_dict()), out_path)
    adapter.forget_fingerprint()
    return {"train_accuracy": accuracy, "final_loss": float(loss.detach())}
