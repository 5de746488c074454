"""A batch ready for the LLM (`MultimodalInputs`) and what training and scoring do with its rows:
the shared prefix of a training batch, and copies of a KV cache by row."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import torch

from mcomp.conversation import IGNORE_INDEX

TEXT = -1  # modality id of text positions
Media = Mapping[str, Any]  # modality key -> one source or a list of sources (paths or decoded media)


@dataclasses.dataclass
class MultimodalInputs:
    """A left-padded batch ready for the LLM."""

    inputs_embeds: torch.Tensor  # [B, T, H]
    attention_mask: torch.Tensor  # [B, T], 0 on padding
    position_ids: torch.Tensor  # [B, T]
    modality_ids: torch.Tensor  # [B, T]: TEXT (-1) or the index of the modality in model.modalities
    labels: torch.Tensor | None = None  # [B, T], IGNORE_INDEX except on continuation tokens
    continuation_ids: list[list[int]] | None = None  # per sample, the continuation token ids


def split_common_prefix(inputs: MultimodalInputs) -> tuple[MultimodalInputs, MultimodalInputs] | None:
    """Split a left-padded training batch into the leading tokens all rows share (same embedding,
    modality and position, no label, and not the one that predicts the first label) as a one-row
    batch, and the rest, whose attention mask also covers that prefix. None when nothing is shared.

    Left padding right-aligns the rows, so the rest is the batch's last columns; a shorter row's own
    copy of the prefix falls inside them and is masked out like padding."""
    embeds, mask = inputs.inputs_embeds, inputs.attention_mask
    batch, width = mask.shape
    lengths = mask.sum(-1)
    labelled = inputs.labels != IGNORE_INDEX
    if batch < 2 or not bool(labelled.any(-1).all()):
        return None
    starts = width - lengths
    first_label = labelled.float().argmax(-1) - starts  # within each row's real tokens
    limit = int(first_label.min()) - 1
    if limit < 1:
        return None
    cols = starts[:, None] + torch.arange(limit, device=mask.device)[None]
    same = (embeds.gather(1, cols[..., None].expand(-1, -1, embeds.shape[-1])) == embeds[:1, cols[0]]).all(-1)
    same &= inputs.modality_ids.gather(1, cols) == inputs.modality_ids[:1, cols[0]]
    same &= inputs.position_ids.gather(1, cols) == torch.arange(limit, device=mask.device)[None]
    shared = int(same.all(0).long().cumprod(0).sum())
    if shared < 1:
        return None
    head = cols[0, :shared]
    prefix = MultimodalInputs(
        embeds[:1, head], mask[:1, head], inputs.position_ids[:1, head], inputs.modality_ids[:1, head]
    )
    keep = int(lengths.max()) - shared
    rest_mask = mask[:, -keep:].clone()
    within = torch.arange(width - keep, width, device=mask.device)[None]
    rest_mask[(within >= starts[:, None]) & (within < starts[:, None] + shared)] = 0  # shorter rows' own prefix
    rest = MultimodalInputs(
        embeds[:, -keep:],
        torch.cat([mask.new_ones(batch, shared), rest_mask], dim=1),
        inputs.position_ids[:, -keep:],
        inputs.modality_ids[:, -keep:],
        labels=inputs.labels[:, -keep:],
    )
    return prefix, rest


def select_cache(cache, rows: torch.Tensor):
    """A copy of a KV cache whose batch row k is row `rows[k]` of `cache` (rows may repeat);
    `cache` itself is left unchanged."""
    if hasattr(cache, "layers"):  # transformers Cache objects: layers reassign their tensors when selecting
        new = copy.copy(cache)
        new.layers = [copy.copy(layer) for layer in cache.layers]
    else:
        new = copy.deepcopy(cache)
    new.batch_select_indices(rows)
    return new
