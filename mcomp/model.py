"""The multimodal model: a transformers causal LM plus modality adapters spliced into its input.

Data path for one sample:
    prompt text --tokenize_with_placeholders--> ids with sentinel ids at placeholders
    media files --adapter.prepare/forward--> [num_tokens, hidden] per input
    ids + features --_assemble--> inputs_embeds (each sentinel replaced by its input's features)
Samples are left-padded into a batch; position ids follow the attention mask.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
from collections import defaultdict
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mcomp import scoring
from mcomp.batch import TEXT, Media, MultimodalInputs, select_cache, split_common_prefix
from mcomp.checkpoint import load_mllm, save_mllm
from mcomp.conversation import IGNORE_INDEX, conversation_turns, template_for
from mcomp.errors import MediaBatchError, PlaceholderMismatchError, SampleError
from mcomp.lora import TEXT_ROUTE, LoraSpec, RoutingState, inject_routed_layers, routed_layers
from mcomp.modality import AdapterConfig, ModalityAdapter, build_adapter
from mcomp.scoring import LoglikelihoodRequest, LoglikelihoodResult
from mcomp.tokenization import slow_llama_encoder, tokenize_continuation, tokenize_with_placeholders

__all__ = [
    "IGNORE_INDEX",
    "LoglikelihoodRequest",
    "LoglikelihoodResult",
    "MultimodalInputs",
    "MultimodalLM",
    "split_common_prefix",
]  # the batch and scoring names are read from here too

logger = logging.getLogger(__name__)


class MultimodalLM(nn.Module):
    def __init__(self, llm: nn.Module, tokenizer, adapters: Sequence[ModalityAdapter], template: str = "vicuna_v1"):
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.text_encoder = slow_llama_encoder(tokenizer)  # None: the tokenizer as it is
        names = [a.modality for a in adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"one adapter per modality: got modalities {names}")
        self.adapters = nn.ModuleDict({a.modality: a for a in adapters})
        self.template = template_for(template, tokenizer)
        self.feature_cache = None  # optional mcomp.feature_cache.FeatureCache for encoder outputs
        # a full fine-tune's base: {"base_model": directory, "base_model_sha256": ...} (None: the LLM is the base)
        self.finetuned_from: dict[str, str] | None = None
        self.routing = RoutingState()
        self.lora_spec: LoraSpec | None = None
        # DAMC's learnable tokens around each modality input (none unless added).
        self.prefix_tokens = nn.ParameterDict()
        self.suffix_tokens = nn.ParameterDict()
        self.provenance: dict[str, Any] = {}  # how the model was made (set by train/compose)
        # Sentinel ids for placeholders: negative, so they never collide with the vocabulary.
        self.placeholder_ids = {a.placeholder: -200 - i for i, a in enumerate(adapters)}
        self._sentinel_to_modality = {-200 - i: a.modality for i, a in enumerate(adapters)}
        self._key_to_modality = {}
        for a in adapters:
            for key in (a.modality, *a.aliases):
                self._key_to_modality[key] = a.modality

    @classmethod
    def build(
        cls, llm, tokenizer, adapter_configs: Sequence[AdapterConfig | dict], template: str = "vicuna_v1", seed: int = 0
    ):
        """Adapters are built around `llm`; their random init (towers, projectors) comes from `seed`."""
        hidden = llm.config.get_text_config().hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            adapters = [build_adapter(c, hidden) for c in adapter_configs]
        dtype = next(llm.parameters()).dtype
        # Inference mode by default (dropout off, e.g. in a Q-Former); training calls .train().
        return cls(llm, tokenizer, [a.to(dtype) for a in adapters], template).eval()

    # --- properties -----------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.adapters.keys())

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.llm.config.get_text_config().hidden_size

    def modality_of(self, key: str) -> str:
        if key not in self._key_to_modality:
            raise PlaceholderMismatchError(
                f"this model has no adapter for modality {key!r} (it has: {', '.join(self.modalities) or 'none'})"
            )
        return self._key_to_modality[key]

    # --- inputs ---------------------------------------------------------------------------
    def _normalise_media(self, media: Sequence[Media | None], n: int) -> list[dict[str, list]]:
        if len(media) != n:
            raise ValueError(f"got {n} prompt(s) but {len(media)} media mapping(s)")
        out = []
        for sample in media:
            per = defaultdict(list)
            for key, sources in (sample or {}).items():
                items = list(sources) if isinstance(sources, (list, tuple)) else [sources]
                per[self.modality_of(key)].extend(items)
            out.append(dict(per))
        return out

    def encode_media(self, media: list[dict[str, list]]) -> list[dict[str, list[torch.Tensor]]]:
        """Projected features per sample and modality; all inputs of one modality run as one batch.

        A bad file raises MediaBatchError keyed by *sample* index, naming every failing file.
        """
        features: list[dict[str, list[torch.Tensor]]] = [defaultdict(list) for _ in media]
        failures = {}
        for modality, adapter in self.adapters.items():
            owners = [(i, src) for i, sample in enumerate(media) for src in sample.get(modality, [])]
            if not owners:
                continue
            encoded = self._encode_with_cache(adapter, [src for _, src in owners])
            if isinstance(encoded, MediaBatchError):
                for flat_index, media_err in encoded.failures.items():
                    failures.setdefault(owners[flat_index][0], media_err)
                continue
            projected = adapter.project_features(encoded)
            for (i, _), feats in zip(owners, projected):
                features[i][modality].append(feats)
        if failures:
            raise MediaBatchError(failures)
        return features

    def _encode_with_cache(self, adapter: ModalityAdapter, sources: list) -> list[torch.Tensor] | MediaBatchError:
        """Frozen encoder features of each source, read from / written to the feature cache if set."""
        cache = self.feature_cache
        fingerprint = adapter.fingerprint() if cache is not None else None
        cached = [cache.get(fingerprint, s) if cache is not None else None for s in sources]
        todo = [k for k, c in enumerate(cached) if c is None]
        if todo:
            try:
                tensors = adapter.input_tensors([sources[k] for k in todo])
            except MediaBatchError as err:
                return MediaBatchError({todo[k]: e for k, e in err.failures.items()})
            for k, feats in zip(todo, adapter.encode_tensors(tensors)):
                cached[k] = feats
                if cache is not None:
                    cache.put(fingerprint, sources[k], feats)
        return [c.to(adapter.device) for c in cached]

    def tokenize(self, prompt: str) -> list[int]:
        return tokenize_with_placeholders(
            self.tokenizer,
            prompt,
            self.placeholder_ids,
            self.text_encoder,
            add_special_tokens=self.template.add_special_tokens,
        )

    def _check_placeholders(self, index: int, ids: list[int], media: dict[str, list]) -> None:
        counts = defaultdict(int)
        for t in ids:
            if t in self._sentinel_to_modality:
                counts[self._sentinel_to_modality[t]] += 1
        for modality in sorted(set(counts) | set(media)):
            have, want = len(media.get(modality, [])), counts.get(modality, 0)
            if have != want:
                tag = self.adapters[modality].placeholder
                raise PlaceholderMismatchError(
                    f"the prompt has {want} {tag} placeholder(s) but {have} {modality} input(s) were given", index
                )

    def prepare_inputs(
        self,
        prompts: Sequence[str],
        media: Sequence[Media | None] | None = None,
        continuations: Sequence[str | Sequence[int]] | None = None,
    ) -> MultimodalInputs:
        """Tokenise, encode media, splice and left-pad. Continuations (text or ids) get labels."""
        prompts = list(prompts)
        media_n = self._normalise_media(list(media) if media is not None else [None] * len(prompts), len(prompts))
        ids = [self.tokenize(p) for p in prompts]
        for i, (sample_ids, sample_media) in enumerate(zip(ids, media_n)):
            self._check_placeholders(i, sample_ids, sample_media)
        features = self.encode_media(media_n)
        if continuations is None:
            return self._assemble(ids, features)
        if len(continuations) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompt(s) but {len(continuations)} continuation(s)")
        cont_ids = [
            tokenize_continuation(self.tokenizer, c, self.text_encoder) if isinstance(c, str) else list(c)
            for c in continuations
        ]
        labels = [[IGNORE_INDEX] * len(p) + c for p, c in zip(ids, cont_ids)]
        return self._assemble([p + c for p, c in zip(ids, cont_ids)], features, labels, cont_ids)

    def prepare_conversations(
        self, conversations: Sequence[Sequence[Mapping[str, Any]]], media: Sequence[Media | None] | None = None
    ) -> MultimodalInputs:
        """Training inputs from LLaVA-style turns ({"from": "human"|"gpt", "value": ...}), as the
        published preprocess makes them (`conversation_ids`)."""
        media_n = self._normalise_media(
            list(media) if media is not None else [None] * len(conversations), len(conversations)
        )
        ids, labels = [], []
        for i, turns in enumerate(conversations):
            sample_ids, sample_labels = self.conversation_ids(turns, i)
            self._check_placeholders(i, sample_ids, media_n[i])
            ids.append(sample_ids)
            labels.append(sample_labels)
        return self._assemble(ids, self.encode_media(media_n), labels)

    def conversation_ids(
        self, turns: Sequence[Mapping[str, Any]], index: int | None = None
    ) -> tuple[list[int], list[int]]:
        """(ids, labels) of one conversation: the template renders the whole turn list, which is
        tokenised as one text split only at placeholders, and the labels follow the published rule
        (`ConversationTemplate.answer_labels`: each answer and its end separator). A conversation
        with nothing to learn from raises SampleError (`index` names the sample in its batch)."""
        try:
            pairs = conversation_turns(turns)
        except ValueError as err:
            raise SampleError(str(err), index) from None
        if not any(role == "gpt" and value for role, value in pairs):
            raise SampleError("the conversation has no assistant answer to learn from", index)
        text = self.template.render(pairs)
        sample_ids = self.tokenize(text)
        sample_labels, mismatch = self.template.answer_labels(
            text, sample_ids, self.tokenize, self.tokenizer.pad_token_id, pairs
        )
        if mismatch is not None:
            raise SampleError(
                f"{mismatch} (the published preprocess would silently drop this sample's loss; "
                f"the tokenizer does not tokenise the rounds as the template's rule expects)",
                index,
            )
        if not any(t != IGNORE_INDEX for t in sample_labels):
            raise SampleError("the template's rule leaves no answer token to learn from", index)
        return sample_ids, [IGNORE_INDEX if t < 0 else t for t in sample_labels]

    def _assemble(self, ids, features, labels=None, cont_ids=None) -> MultimodalInputs:
        """Splice features at the sentinels of `ids`; `labels` (aligned with ids) become label rows."""
        embed = self.llm.get_input_embeddings()
        device, dtype = embed.weight.device, embed.weight.dtype
        modality_index = {m: k for k, m in enumerate(self.modalities)}
        seqs, mods, label_rows = [], [], []
        for i, sample_ids in enumerate(ids):
            all_ids = torch.tensor(sample_ids, dtype=torch.long, device=device)
            text_embeds = embed(all_ids.clamp(min=0))
            text_labels = torch.tensor(
                labels[i] if labels is not None else [IGNORE_INDEX] * len(sample_ids), dtype=torch.long
            )
            used = defaultdict(int)
            pieces, piece_mods, piece_labels, start = [], [], [], 0
            sentinel_pos = [p for p, t in enumerate(sample_ids) if t < 0]
            for pos in sentinel_pos + [len(sample_ids)]:
                if pos > start:  # a run of text tokens
                    pieces.append(text_embeds[start:pos])
                    piece_mods.append(torch.full((pos - start,), TEXT, dtype=torch.long))
                    piece_labels.append(text_labels[start:pos])
                if pos < len(sample_ids):  # a placeholder: the next input of its modality
                    modality = self._sentinel_to_modality[sample_ids[pos]]
                    feats = features[i][modality][used[modality]].to(device=device, dtype=dtype)
                    used[modality] += 1
                    if modality in self.prefix_tokens:
                        feats = torch.cat([self.prefix_tokens[modality].to(dtype), feats])
                    if modality in self.suffix_tokens:
                        feats = torch.cat([feats, self.suffix_tokens[modality].to(dtype)])
                    pieces.append(feats)
                    piece_mods.append(torch.full((feats.shape[0],), modality_index[modality], dtype=torch.long))
                    piece_labels.append(torch.full((feats.shape[0],), IGNORE_INDEX, dtype=torch.long))
                start = pos + 1
            seqs.append(torch.cat(pieces))
            mods.append(torch.cat(piece_mods))
            label_rows.append(torch.cat(piece_labels))
        length = max(s.shape[0] for s in seqs)
        batch = len(seqs)
        inputs_embeds = torch.zeros(batch, length, seqs[0].shape[1], dtype=dtype, device=device)
        attention_mask = torch.zeros(batch, length, dtype=torch.long, device=device)
        modality_ids = torch.full((batch, length), TEXT, dtype=torch.long, device=device)
        label_t = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=device)
        for b, (s, m, lab) in enumerate(zip(seqs, mods, label_rows)):
            n = s.shape[0]
            inputs_embeds[b, length - n :] = s
            attention_mask[b, length - n :] = 1
            modality_ids[b, length - n :] = m.to(device)
            label_t[b, length - n :] = lab.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return MultimodalInputs(
            inputs_embeds,
            attention_mask,
            position_ids,
            modality_ids,
            labels=label_t if labels is not None else None,
            continuation_ids=cont_ids,
        )

    # --- model API ------------------------------------------------------------------------
    def forward(self, inputs: MultimodalInputs, share_prefix: bool = False, **kwargs):
        """LLM forward over spliced embeddings; with labels, the loss covers continuation tokens only.

        Positions are routed to LoRA adapters by modality while the call runs.
        `share_prefix` (training): the leading tokens that every row has in common (the system
        prompt) run once, as one row whose keys and values the rows then share, and logits are
        computed only from the first labelled position on. The loss and its gradients are the same
        (to float rounding; with LoRA dropout, the prefix shares one dropout mask); the output's
        logits cover only those last positions.
        """
        if share_prefix and inputs.labels is not None and not kwargs:
            split = split_common_prefix(inputs)
            if split is not None:
                return self._forward_after_prefix(*split, whole=inputs)
        self.routing.route_ids = self._route_ids(inputs.modality_ids)
        try:
            return self.llm(
                inputs_embeds=inputs.inputs_embeds,
                attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids,
                labels=inputs.labels,
                **kwargs,
            )
        finally:
            self.routing.route_ids = None

    def _forward_after_prefix(self, prefix: MultimodalInputs, rest: MultimodalInputs, whole: MultimodalInputs):
        cache = self.forward(prefix, use_cache=True).past_key_values
        if cache is None:  # the LLM keeps no cache in training (e.g. activation checkpointing is on)
            return self.forward(whole)
        rows = torch.zeros(rest.inputs_embeds.shape[0], dtype=torch.long, device=rest.inputs_embeds.device)
        kwargs = {}
        if _accepts(type(self.llm), "logits_to_keep"):  # logits only from the one that predicts the first label
            keep = rest.labels.shape[1] - int((rest.labels != IGNORE_INDEX).float().argmax(-1).min()) + 1
            rest = dataclasses.replace(rest, labels=rest.labels[:, -keep:])
            kwargs["logits_to_keep"] = keep
        return self.forward(rest, past_key_values=select_cache(cache, rows), use_cache=True, **kwargs)

    # --- the evaluation API (mcomp.scoring.EvalModel): scoring's functions, bound as methods ---
    generate = scoring.generate
    loglikelihood = scoring.loglikelihood
    loglikelihood_batch = scoring.loglikelihood_batch

    def inserted_tokens(self, modality: str) -> int:
        """Positions one input of `modality` occupies: prefix + features + suffix."""
        n = self.adapters[modality].num_tokens
        for tokens in (self.prefix_tokens, self.suffix_tokens):
            if modality in tokens:
                n += tokens[modality].shape[0]
        return n

    # --- LoRA and routing -----------------------------------------------------------------
    @property
    def lora_adapters(self) -> list[str]:
        layers = routed_layers(self.llm)
        return list(next(iter(layers.values())).lora_A.keys()) if layers else []

    def add_lora(
        self, spec: LoraSpec | None = None, name: str = TEXT_ROUTE, seed: int = 0, zero_b: bool = True, **spec_fields
    ) -> None:
        """Add a LoRA adapter `name` on every targeted linear layer (peft's init: B = 0)."""
        spec = spec or LoraSpec(**spec_fields)
        if self.lora_spec is None:
            inject_routed_layers(self.llm, spec.target_modules, self.routing)
            self.lora_spec = spec
        elif set(spec.target_modules) != set(self.lora_spec.target_modules):
            raise ValueError(
                f"all LoRA adapters must target the same modules: {spec.target_modules} "
                f"vs {self.lora_spec.target_modules}"
            )
        if name in self.lora_adapters:
            raise ValueError(f"LoRA adapter {name!r} already exists")
        g = torch.Generator().manual_seed(seed)
        for layer in routed_layers(self.llm).values():
            layer.add_adapter(name, spec.r, spec.alpha, spec.dropout, zero_b=zero_b, generator=g)

    def set_routes(self, routes: dict[str, list[tuple[str, float]]]) -> None:
        """Which adapters (and coefficients) each route uses; see `mcomp.lora`."""
        known = set(self.lora_adapters)
        for route, terms in routes.items():
            if route != TEXT_ROUTE and route not in self.adapters:
                raise ValueError(f"route {route!r} is neither 'text' nor a modality of this model ({self.modalities})")
            for adapter_name, _ in terms:
                if adapter_name not in known:
                    raise ValueError(
                        f"route {route!r} uses unknown LoRA adapter {adapter_name!r} (have {sorted(known)})"
                    )
        self.routing.set_routes({r: [(n, float(c)) for n, c in t] for r, t in routes.items()})

    def add_modality_tokens(self, modality: str, prefix: int, suffix: int) -> None:
        """Learnable tokens around each input of `modality` (zero-initialised, as published)."""
        dtype = self.llm.get_input_embeddings().weight.dtype
        for tokens, n in ((self.prefix_tokens, prefix), (self.suffix_tokens, suffix)):
            if n > 0:
                tokens[modality] = nn.Parameter(torch.zeros(n, self.hidden_size, dtype=dtype, device=self.device))

    def _route_ids(self, modality_ids: torch.Tensor) -> torch.Tensor:
        self.routing.route_names = [TEXT_ROUTE] + self.modalities
        return modality_ids + 1  # TEXT (-1) -> route 0, modality k -> route k + 1

    # --- persistence ----------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        save_mllm(self, path, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "MultimodalLM":
        return load_mllm(path, cls, **kwargs)


@functools.cache
def _accepts(llm_class: type, name: str) -> bool:
    """Whether `llm_class.forward` takes keyword `name` (looked up once per class)."""
    return name in inspect.signature(llm_class.forward).parameters
