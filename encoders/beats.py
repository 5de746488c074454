"""BEATs audio encoder (Chen et al., 2022, "BEATs: Audio Pre-Training with Acoustic Tokenizers").

Written for mcomp from the paper and the published architecture; state-dict key names are those of
the released checkpoints (e.g. `BEATs_iter3_plus_AS2M.pt`) so they load strictly:

    fbank [B, T, F] --Conv2d(1->embed, k=s=patch)--> [B, embed, T/p, F/p] --flatten (token = t*(F/p) + f)-->
    LayerNorm(embed) --post_extract_proj--> [B, N, D] --conv positional encoding, LayerNorm-->
    L transformer layers (post-LN with deep-norm residual scaling, bucketed relative position bias,
    gated per layer by the query) --> [B, N, D]

Only inference is modelled (the encoder is frozen): the dropouts and layer-drop of training are absent.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from mcomp.configuration import JsonConfig

logger = logging.getLogger(__name__)

# Fields of the upstream BEATsConfig that only matter for training or for the classification head.
TRAINING_ONLY_FIELDS = frozenset(
    {
        "dropout",
        "attention_dropout",
        "activation_dropout",
        "encoder_layerdrop",
        "dropout_input",
        "layer_wise_gradient_decay_ratio",
        "predictor_dropout",
        "predictor_class",
        "finetuned_model",
    }
)


@dataclasses.dataclass
class BEATsConfig(JsonConfig):
    """Architecture of a BEATs encoder; field names as in the upstream config (`cfg` of a checkpoint).

    Defaults are the published `BEATs_iter3_plus_AS2M` shape. Note: the upstream config *class* defaults
    to max_distance 1280 and has rel-pos/deep-norm off; the released checkpoints set them in their `cfg`.
    max_distance 800 is the value ports of that checkpoint use (unverified here against the file).
    """

    input_patch_size: int = 16
    embed_dim: int = 512  # patch embedding width
    conv_bias: bool = False  # bias of the patch embedding (absent in the release)
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False  # pre-LN; the release is post-LN with deep-norm
    deep_norm: bool = True
    conv_pos: int = 128  # kernel of the convolutional positional encoding
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True  # query-gated relative position bias
    layer_norm_eps: float = 1e-5  # torch LayerNorm default, as upstream

    def __post_init__(self):
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError(
                f"BEATsConfig: encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                f"encoder_attention_heads {self.encoder_attention_heads}"
            )
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise ValueError(
                f"BEATsConfig: encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                f"conv_pos_groups {self.conv_pos_groups}"
            )
        if self.deep_norm and self.layer_norm_first:
            raise ValueError("BEATsConfig: deep_norm and layer_norm_first cannot both be set (as upstream)")
        if self.activation_fn not in _ACTIVATIONS:
            raise ValueError(
                f"BEATsConfig: activation_fn {self.activation_fn!r} not supported "
                f"(expected one of {sorted(_ACTIVATIONS)})"
            )
        if self.input_patch_size < 1:
            raise ValueError(f"BEATsConfig: input_patch_size must be positive, got {self.input_patch_size}")
        if self.relative_position_embedding and (self.num_buckets < 4 or self.max_distance <= self.num_buckets // 4):
            raise ValueError(
                f"BEATsConfig: need num_buckets >= 4 and max_distance > num_buckets // 4, got "
                f"{self.num_buckets} / {self.max_distance}"
            )

    @classmethod
    def from_checkpoint_cfg(cls, cfg: dict[str, Any], *, source: str = "checkpoint cfg") -> "BEATsConfig":
        """The `cfg` dict stored in an upstream checkpoint; training-only fields are dropped."""
        dropped = sorted(set(cfg) & TRAINING_ONLY_FIELDS)
        if dropped:
            logger.debug("%s: ignoring training-only BEATs fields %s", source, dropped)
        return cls.from_dict({k: v for k, v in cfg.items() if k not in TRAINING_ONLY_FIELDS}, source=source)


_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}  # exact-erf GELU, as fairseq's "gelu"


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5-style buckets: half the buckets per direction (keys after the query in the upper
    half); within a half, exact buckets below num_buckets//4, logarithmic ones up to max_distance."""
    half = num_buckets // 2
    offset = (relative_position > 0).long() * half
    distance = relative_position.abs()
    max_exact = half // 2
    # Same float32 operation order as the published code, so buckets agree at the boundaries;
    # clamp(min=1) only avoids log(0) in the branch that is not selected.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return offset + torch.where(distance < max_exact, distance, large)


class TrimLast(nn.Module):
    """Drop the extra trailing frame that an even-kernel 'same' convolution produces (upstream SamePad)."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : x.shape[-1] - self.remove] if self.remove else x


class BEATsSelfAttention(nn.Module):
    def __init__(self, cfg: BEATsConfig, relative_attention_bias: nn.Embedding | None):
        super().__init__()
        dim, heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.num_heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        if relative_attention_bias is not None:
            # One table shared by all layers (upstream assigns layer 0's module to every layer, so the
            # state dict lists it under each layer name).
            self.relative_attention_bias = relative_attention_bias
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None) -> torch.Tensor:
        batch, length, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        bias = None
        if position_bias is not None:
            bias = position_bias.unsqueeze(0)  # [1, H, L, L]
            if self.gru_rel_pos:
                # Gate from the unscaled per-head query: 8 outputs summed in two groups of 4.
                gates = torch.sigmoid(self.grep_linear(q).view(batch, self.num_heads, length, 2, 4).sum(-1))
                gate_a, gate_b = gates[..., :1], gates[..., 1:]
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias  # [B, H, L, L]
            bias = bias.to(q.dtype)
        # softmax(q.k / sqrt(d) + bias): upstream subtracts the row max first, which does not change it.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class BEATsLayer(nn.Module):
    def __init__(self, cfg: BEATsConfig, relative_attention_bias: nn.Embedding | None):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.self_attn = BEATsSelfAttention(cfg, relative_attention_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.activation = _ACTIVATIONS[cfg.activation_fn]()
        self.layer_norm_first = cfg.layer_norm_first
        # Deep-norm up-weights the residual branch by (2N)^(1/4) in post-LN layers.
        self.residual_scale = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), position_bias)
            return x + self.fc2(self.activation(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x * self.residual_scale + self.self_attn(x, position_bias))
        return self.final_layer_norm(x * self.residual_scale + self.fc2(self.activation(self.fc1(x))))


class BEATsEncoder(nn.Module):
    """Convolutional positional encoding + transformer layers (state-dict prefix `encoder.`)."""

    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        conv = nn.Conv1d(dim, dim, kernel_size=cfg.conv_pos, padding=cfg.conv_pos // 2, groups=cfg.conv_pos_groups)
        # Published init (fairseq wav2vec 2.0): N(0, sqrt(4 / (k * D))), zero bias, then weight norm over dim 2.
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (cfg.conv_pos * dim)))
        nn.init.zeros_(conv.bias)
        # The parametrization loads upstream `weight_g`/`weight_v` keys through torch's own compat hook.
        self.pos_conv = nn.Sequential(weight_norm(conv, name="weight", dim=2), TrimLast(cfg.conv_pos), nn.GELU())
        self.layer_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.layer_norm_first = cfg.layer_norm_first
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        shared_bias = (
            nn.Embedding(cfg.num_buckets, cfg.encoder_attention_heads) if cfg.relative_position_embedding else None
        )
        self.layers = nn.ModuleList(BEATsLayer(cfg, shared_bias) for _ in range(cfg.encoder_layers))
        self.register_state_dict_post_hook(_unshare_relative_bias)

    def position_bias(self, length: int) -> torch.Tensor | None:
        """[H, L, L] bias from the shared bucket table (computed once, used by every layer)."""
        table = getattr(self.layers[0].self_attn, "relative_attention_bias", None)
        if table is None:
            return None
        pos = torch.arange(length, device=table.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return table(buckets).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        bias = self.position_bias(x.shape[1])
        for layer in self.layers:
            x = layer(x, bias)
        return self.layer_norm(x) if self.layer_norm_first else x


def _unshare_relative_bias(module: BEATsEncoder, state_dict: dict, prefix: str, local_metadata) -> None:
    """The shared bias table appears under every layer name (as upstream); give layers >= 1 their own
    copy so the state dict has no aliased storage (safetensors refuses shared tensors)."""
    for i in range(1, len(module.layers)):
        key = f"{prefix}layers.{i}.self_attn.relative_attention_bias.weight"
        value = state_dict.get(key)
        if value is not None and not isinstance(value, nn.Parameter):  # keep_vars=True: leave as is
            state_dict[key] = value.clone()


class BEATs(nn.Module):
    """BEATs feature extractor: normalised fbank [B, T, F] -> final-layer tokens [B, (T/p)*(F/p), D]."""

    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=p, stride=p, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.post_extract_proj = (
            nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim) if cfg.embed_dim != cfg.encoder_embed_dim else None
        )
        self.encoder = BEATsEncoder(cfg)
        self._init_weights()
        self.register_load_state_dict_pre_hook(_drop_classifier_head)

    @property
    def width(self) -> int:
        return self.cfg.encoder_embed_dim

    def num_tokens(self, num_frames: int, num_mel_bins: int) -> int:
        p = self.cfg.input_patch_size
        return (num_frames // p) * (num_mel_bins // p)

    def _init_weights(self) -> None:
        """Published random init: BERT-style N(0, 0.02) for linears and the bias table, then deep-norm
        Xavier gains for the attention and FFN weights (the pos-conv and patch conv keep their own)."""
        for m in self.encoder.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        if self.cfg.deep_norm:
            beta = math.pow(8 * self.cfg.encoder_layers, -0.25)
            for layer in self.encoder.layers:
                attn = layer.self_attn
                for weight, gain in (
                    (attn.q_proj.weight, 1.0),
                    (attn.k_proj.weight, 1.0),
                    (attn.v_proj.weight, beta),
                    (attn.out_proj.weight, beta),
                    (layer.fc1.weight, beta),
                    (layer.fc2.weight, beta),
                ):
                    nn.init.xavier_normal_(weight, gain=gain)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        p = self.cfg.input_patch_size
        if fbank.dim() != 3 or fbank.shape[1] < p or fbank.shape[2] < p:
            raise ValueError(
                f"BEATs input fbank must be [batch, frames >= {p}, mel bins >= {p}], got {tuple(fbank.shape)}"
            )
        x = self.patch_embedding(fbank.unsqueeze(1).to(self.patch_embedding.weight.dtype))  # [B, E, T/p, F/p]
        x = x.flatten(2).transpose(1, 2)  # time-major tokens: t * (F/p) + f
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return self.encoder(x)


def _drop_classifier_head(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
):
    """Fine-tuned checkpoints carry an AudioSet classifier (`predictor.*`); the features do not use it."""
    for key in [k for k in state_dict if k.startswith(prefix + "predictor.")]:
        del state_dict[key]


def read_beats_checkpoint(path: str) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    """(cfg, state dict) from an upstream `{'cfg': ..., 'model': ...}` file or a bare state dict.

    Pickles are opened with `weights_only=True` only (mcomp.io.load_tensors); the upstream file holds
    nothing but a dict of plain values and tensors, so it passes.
    """
    from mcomp.io import load_tensors

    obj = load_tensors(path)
    if isinstance(obj.get("model"), dict):
        cfg = obj.get("cfg")
        if cfg is not None and not isinstance(cfg, dict):
            raise ValueError(f"{path}: 'cfg' must be a dict of BEATs config fields, got {type(cfg).__name__}")
        return cfg, obj["model"]
    return None, obj


def load_beats(path: str, overrides: dict[str, Any] | None = None) -> BEATs:
    """Build a BEATs from a local checkpoint; its stored `cfg` decides the shape, and explicit
    `overrides` must agree with it."""
    cfg_dict, state = read_beats_checkpoint(path)
    fields = dict(cfg_dict or {})
    fields = {k: v for k, v in fields.items() if k not in TRAINING_ONLY_FIELDS}
    for key, value in (overrides or {}).items():
        if key in fields and fields[key] != value:
            raise ValueError(f"{path}: encoder_config sets {key}={value!r} but the checkpoint cfg has {fields[key]!r}")
        fields[key] = value
    cfg = BEATsConfig.from_dict(fields, source=f"{path} (cfg)")
    model = BEATs(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: BEATs weights do not match the config: {err}") from None
    logger.info("loaded BEATs weights from %s", path)
    return model
