"""The audio Q-Former projector (`qformer_<N>N_<L>L`) of the published audio MLLM.

Learned queries read the encoder tokens through BERT layers (BLIP-2 style, cross-attention in every
layer, query-only feed-forward), then a linear map gives the LLM width:

    features [B, n, E] + audio_position_embedding[0..n-1]
    audio_query_tokens [1, Q, H] --embeddings LayerNorm--> L x (self-attn over queries,
    cross-attn to the features, query FFN) --audio_llama_proj--> [B, Q, llm_hidden]

Parameter names are the released ones (`audio_query_tokens`, `audio_position_embedding.weight`,
`audio_Qformer.bert.*`, `audio_llama_proj.*`): 58 tensors at the default size. The BERT parts that
the release removes (word/position embeddings, text FFN, LM head) are never built, and no buffer is
registered, so the state dict is exactly the saved parameter set.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn

QFORMER_TYPE = re.compile(r"qformer_(\d+)N_(\d+)L")


def parse_qformer_type(projector_type: str) -> tuple[int, int] | None:
    """(num_queries, num_layers) for `qformer_<N>N_<L>L`, None for other projector types."""
    match = QFORMER_TYPE.fullmatch(projector_type)
    if match is None:
        return None
    queries, layers = int(match.group(1)), int(match.group(2))
    if queries < 1 or layers < 1:
        raise ValueError(f"projector_type {projector_type!r}: needs at least one query and one layer")
    return queries, layers


@dataclasses.dataclass
class QFormerConfig:
    """Defaults: bert-base layers (768 wide, 12 heads, FFN 3072, LayerNorm eps 1e-12), as released."""

    num_queries: int = 32
    num_layers: int = 2
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    encoder_width: int = 768  # width of the encoder tokens (keys/values of the cross-attention)
    max_positions: int = 1024  # rows of audio_position_embedding: the most encoder tokens accepted
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1  # bert-base hidden and attention dropout; active only in training mode
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"Q-Former hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @classmethod
    def from_projector_type(cls, projector_type: str, **fields) -> "QFormerConfig":
        parsed = parse_qformer_type(projector_type)
        if parsed is None:
            raise ValueError(f"projector_type {projector_type!r} is not a Q-Former type (expected 'qformer_<N>N_<L>L')")
        return cls(num_queries=parsed[0], num_layers=parsed[1], **fields)


class BertAttentionCore(nn.Module):
    """Multi-head attention with BERT's names (`query`, `key`, `value`)."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout = cfg.dropout

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, n_q, width = hidden.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, t.shape[1], self.num_heads, width // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.query(hidden)),
            heads(self.key(context)),
            heads(self.value(context)),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return out.transpose(1, 2).reshape(batch, n_q, width)


class AddNorm(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): BERT's `*Output` blocks."""

    def __init__(self, in_width: int, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.self = BertAttentionCore(cfg, kv_width)
        self.output = AddNorm(cfg.hidden_size, cfg)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, context), hidden)


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden))  # exact-erf GELU (BERT "gelu")


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden_size)
        self.crossattention = BertAttention(cfg, cfg.encoder_width)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = AddNorm(cfg.intermediate_size, cfg)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        queries = self.attention(queries, queries)
        queries = self.crossattention(queries, features)
        return self.output_query(self.intermediate_query(queries), queries)


class QFormerEmbeddings(nn.Module):
    """Only the LayerNorm (and dropout) remain: the queries are the whole input."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.LayerNorm(queries))


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg) for _ in range(cfg.num_layers))


class QFormerBert(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.embeddings = QFormerEmbeddings(cfg)
        self.encoder = QFormerEncoder(cfg)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(queries)
        for layer in self.encoder.layer:
            hidden = layer(hidden, features)
        return hidden


class QFormerModel(nn.Module):
    """Holds `bert` so the names read `audio_Qformer.bert.*`, as released."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.bert = QFormerBert(cfg)


class QFormerProjector(nn.Module):
    """Encoder tokens [B, n, encoder_width] -> [B, num_queries, out_dim]."""

    def __init__(self, cfg: QFormerConfig, out_dim: int):
        super().__init__()
        self.cfg = cfg
        self.audio_query_tokens = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.hidden_size))
        self.audio_position_embedding = nn.Embedding(cfg.max_positions, cfg.encoder_width)
        self.audio_Qformer = QFormerModel(cfg)
        self.audio_llama_proj = nn.Linear(cfg.hidden_size, out_dim)
        self._init_weights()

    @property
    def num_queries(self) -> int:
        return self.cfg.num_queries

    def _init_weights(self) -> None:
        """As released: BERT init inside the Q-Former and for the queries; torch defaults for the
        position embedding and the LLM projection (plain nn modules upstream)."""
        std = self.cfg.initializer_range
        nn.init.normal_(self.audio_query_tokens, std=std)
        for m in self.audio_Qformer.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 3 or features.shape[-1] != self.cfg.encoder_width:
            raise ValueError(
                f"Q-Former input features must be [batch, tokens, {self.cfg.encoder_width}], "
                f"got {tuple(features.shape)}"
            )
        n = features.shape[1]
        if n > self.cfg.max_positions:
            raise ValueError(
                f"Q-Former got {n} encoder tokens but audio_position_embedding has only {self.cfg.max_positions} rows"
            )
        positions = torch.arange(n, device=features.device)
        features = features + self.audio_position_embedding(positions)[None]
        queries = self.audio_query_tokens.expand(features.shape[0], -1, -1)
        return self.audio_llama_proj(self.audio_Qformer.bert(queries, features))


def build_qformer_projector(
    config, projector_type: str, encoder_width: int, encoder_tokens: int, out_dim: int
) -> QFormerProjector:
    """A Q-Former from the `qformer_*` fields shared by the audio adapter configs."""
    qcfg = QFormerConfig.from_projector_type(
        projector_type,
        hidden_size=config.qformer_hidden_size,
        num_heads=config.qformer_num_heads,
        intermediate_size=config.qformer_intermediate_size,
        encoder_width=encoder_width,
        max_positions=config.qformer_max_positions,
        dropout=config.qformer_dropout,
    )
    if encoder_tokens > qcfg.max_positions:
        raise ValueError(
            f"{config.adapter} adapter: the encoder gives {encoder_tokens} tokens per input but "
            f"qformer_max_positions is {qcfg.max_positions}"
        )
    return QFormerProjector(qcfg, out_dim)


class QFormerProjectorMixin:
    """For adapters whose projector is either a Q-Former (`qformer_<N>N_<L>L`) or a standard one."""

    def build_projector(self):
        if parse_qformer_type(self.config.projector_type) is None:
            return super().build_projector()
        return build_qformer_projector(
            self.config, self.config.projector_type, self.encoder_dim, self.encoder_tokens, self.llm_hidden_size
        )
