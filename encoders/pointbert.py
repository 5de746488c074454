"""Point-BERT v1.2 point-cloud encoder: the `PointTransformer` of PointLLM, used by ModelCompose.

Architecture (published config `PointTransformer_8192point_2layer`, point_dims 6, no max pool):

    points [B, N, 6] --FPS--> 512 centres --kNN 32--> groups [B, 512, 32, 6]
        (xyz relative to the group centre, rgb as given)
    --mini-PointNet--> [B, 512, 256] --reduce_dim--> [B, 512, 384]
    CLS token + 12 pre-norm transformer blocks (positional MLP on the centres added before every
    block) + LayerNorm --> [B, 513, 384]

Module and parameter names reproduce the released state dict (`cls_token`, `encoder.first_conv.0.weight`,
`blocks.blocks.3.attn.qkv.weight`, ...), so `point_bert_v1.2.pt` loads strictly.

Deviations from the released code, all numerically neutral except the first:
* FPS start index: upstream draws it with `torch.randint` from the global RNG, so the same cloud can
  give different tokens on every call. `fps_start="seeded"` (default) draws it from a generator seeded
  with `seed` instead; `"zero"` starts at point 0; `"random"` is the upstream behaviour.
* Grouping (FPS, kNN, centring) runs in float32 whatever the weight dtype (upstream: the model dtype,
  fp16 at evaluation); the groups are cast to the weight dtype before the mini-PointNet.
* kNN neighbours come back sorted by distance (upstream: unsorted); the mini-PointNet max-pools over
  each group, so the order does not change the output.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from mcomp.configuration import JsonConfig

logger = logging.getLogger(__name__)

FPS_START_MODES = ("seeded", "zero", "random")


@dataclasses.dataclass
class PointBertConfig(JsonConfig):
    """Encoder shape. Defaults are the published Point-BERT v1.2 (21,859,200 parameters)."""

    trans_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_group: int = 512  # FPS centres = output tokens besides CLS
    group_size: int = 32  # neighbours per centre
    encoder_dims: int = 256  # mini-PointNet output width
    # mini-PointNet inner widths: first conv width/2 -> width, second conv 2*width -> 2*width (published: 256,
    # i.e. 128/256/512). The second conv is most of the encoder's compute; tiny configs narrow it.
    pointnet_width: int = 256
    point_dims: int = 6  # 6 = xyz + rgb (as released); 3 = xyz only

    def __post_init__(self):
        for name in ("trans_dim", "depth", "num_heads", "num_group", "group_size", "encoder_dims", "pointnet_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PointBertConfig.{name} must be a positive integer, got {value!r}")
        if self.trans_dim % self.num_heads:
            raise ValueError(
                f"PointBertConfig.trans_dim ({self.trans_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.pointnet_width % 2:
            raise ValueError(
                f"PointBertConfig.pointnet_width must be even (its first conv is half as wide), "
                f"got {self.pointnet_width}"
            )
        if self.point_dims not in (3, 6):
            raise ValueError(f"PointBertConfig.point_dims must be 3 (xyz) or 6 (xyz + rgb), got {self.point_dims!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"PointBertConfig.mlp_ratio must be positive, got {self.mlp_ratio!r}")


# --- grouping -----------------------------------------------------------------------------
def farthest_point_sample(xyz: torch.Tensor, num_samples: int, start: torch.Tensor) -> torch.Tensor:
    """Indices [B, num_samples] of iterative farthest points, beginning at `start` [B].

    Each step picks the point whose squared distance to the nearest chosen point is largest
    (first index on ties), as the released `misc.fps`.
    """
    batch, n, _ = xyz.shape
    if num_samples > n:
        raise ValueError(f"cannot sample {num_samples} farthest points from a cloud of {n} points")
    rows = torch.arange(batch, device=xyz.device)
    chosen = torch.empty(batch, num_samples, dtype=torch.long, device=xyz.device)
    nearest = torch.full((batch, n), float("inf"), dtype=xyz.dtype, device=xyz.device)
    current = start.to(device=xyz.device, dtype=torch.long)
    for i in range(num_samples):
        chosen[:, i] = current
        centre = xyz[rows, current].unsqueeze(1)  # [B, 1, 3]
        nearest = torch.minimum(nearest, ((xyz - centre) ** 2).sum(-1))
        current = nearest.argmax(-1)
    return chosen


def square_distance(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Pairwise squared distances [B, S, N] by the expansion |a|^2 + |b|^2 - 2ab (as released)."""
    dist = -2 * torch.matmul(src, dst.transpose(1, 2))
    dist += (src**2).sum(-1).unsqueeze(-1)
    dist += (dst**2).sum(-1).unsqueeze(-2)
    return dist


def knn_indices(k: int, xyz: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Indices [B, S, k] of the k points of `xyz` [B, N, 3] nearest each query [B, S, 3], nearest first."""
    if k > xyz.shape[1]:
        raise ValueError(f"cannot take {k} nearest neighbours in a cloud of {xyz.shape[1]} points")
    return square_distance(query, xyz).topk(k, dim=-1, largest=False, sorted=True).indices


def gather_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """points [B, N, C] indexed by idx [B, *S] -> [B, *S, C]."""
    rows = torch.arange(points.shape[0], device=points.device).view(-1, *([1] * (idx.dim() - 1)))
    return points[rows, idx]


def group_points(
    points: torch.Tensor, num_group: int, group_size: int, start: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbourhoods [B, G, M, C] (xyz minus the centre, other channels as given) and centres [B, G, 3]."""
    xyz = points[..., :3]
    centres = gather_points(xyz, farthest_point_sample(xyz, num_group, start))
    groups = gather_points(points, knn_indices(group_size, xyz, centres))
    rel_xyz = groups[..., :3] - centres.unsqueeze(2)
    return torch.cat([rel_xyz, groups[..., 3:]], dim=-1), centres


# --- modules (names match the released state dict) -----------------------------------------
class MiniPointNet(nn.Module):
    """Per-group shared MLP with a global-feature concat; the released `Encoder`."""

    def __init__(self, out_dims: int, in_dims: int, width: int = 256):
        super().__init__()
        self.out_dims = out_dims
        half, double = width // 2, 2 * width
        self.first_conv = nn.Sequential(
            nn.Conv1d(in_dims, half, 1), nn.BatchNorm1d(half), nn.ReLU(inplace=True), nn.Conv1d(half, width, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(double, double, 1), nn.BatchNorm1d(double), nn.ReLU(inplace=True), nn.Conv1d(double, out_dims, 1)
        )

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        batch, g, m, c = groups.shape
        feat = self.first_conv(groups.reshape(batch * g, m, c).transpose(1, 2))  # [BG, width, M]
        pooled = feat.max(dim=2, keepdim=True).values
        feat = torch.cat([pooled.expand(-1, -1, m), feat], dim=1)  # global first, as released
        feat = self.second_conv(feat)
        return feat.max(dim=2).values.reshape(batch, g, self.out_dims)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, c = x.shape
        q, k, v = self.qkv(x).reshape(batch, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        # explicit softmax attention, as released (no fused kernel: keeps fp16 numerics close)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(batch, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (drop path is inactive at inference and omitted)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    """The blocks, with the positional embedding re-added before each one."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointBert(nn.Module):
    """Point cloud [B, N, >=point_dims] (xyz first) -> tokens [B, num_group + 1, trans_dim], CLS first."""

    def __init__(self, config: PointBertConfig | None = None, fps_start: str = "seeded", seed: int = 0):
        super().__init__()
        if fps_start not in FPS_START_MODES:
            raise ValueError(f"fps_start must be one of {FPS_START_MODES}, got {fps_start!r}")
        self.config = config = config or PointBertConfig()
        self.fps_start = fps_start
        self.seed = int(seed)
        self.encoder = MiniPointNet(config.encoder_dims, config.point_dims, config.pointnet_width)
        self.reduce_dim = nn.Linear(config.encoder_dims, config.trans_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.trans_dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, config.trans_dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, config.trans_dim))
        self.blocks = TransformerEncoder(config.trans_dim, config.depth, config.num_heads, config.mlp_ratio)
        self.norm = nn.LayerNorm(config.trans_dim)

    @property
    def num_tokens(self) -> int:
        return self.config.num_group + 1

    def fps_start_indices(self, batch: int, num_points: int, device: torch.device) -> torch.Tensor:
        """Start index per sample. "seeded" gives every cloud the same index (drawn once from `seed`),
        so a cloud's tokens do not depend on the batch it is in."""
        if self.fps_start == "zero":
            return torch.zeros(batch, dtype=torch.long, device=device)
        if self.fps_start == "random":  # upstream: global RNG, a fresh start per sample
            return torch.randint(0, num_points, (batch,), device=device)
        gen = torch.Generator().manual_seed(self.seed)
        start = torch.randint(0, num_points, (1,), generator=gen)
        return start.expand(batch).to(device)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if points.dim() != 3 or points.shape[-1] < cfg.point_dims:
            raise ValueError(
                f"Point-BERT expects points [B, N, {cfg.point_dims}] (xyz{' + rgb' if cfg.point_dims == 6 else ''}), "
                f"got shape {tuple(points.shape)}"
            )
        batch, n, _ = points.shape
        if n < max(cfg.num_group, cfg.group_size):
            raise ValueError(
                f"Point-BERT needs at least {max(cfg.num_group, cfg.group_size)} points "
                f"(num_group {cfg.num_group}, group_size {cfg.group_size}), got {n}"
            )
        dtype = self.reduce_dim.weight.dtype
        start = self.fps_start_indices(batch, n, points.device)
        groups, centres = group_points(points[..., : cfg.point_dims].float(), cfg.num_group, cfg.group_size, start)
        tokens = self.reduce_dim(self.encoder(groups.to(dtype)))
        x = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(batch, -1, -1), self.pos_embed(centres.to(dtype))], dim=1)
        return self.norm(self.blocks(x, pos))

    def load_checkpoint(self, path: str) -> None:
        """Load weights strictly from a local file (see `read_pointbert_state`)."""
        state = read_pointbert_state(path)
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in sorted(set(state) & set(expected))
            if tuple(state[k].shape) != tuple(expected[k].shape)
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path}: Point-BERT weights do not match this encoder config: missing {missing[:10]}, "
                f"unexpected {unexpected[:10]}, wrong shapes {wrong[:10]}"
            )
        self.load_state_dict(state, strict=True)
        logger.info("loaded Point-BERT weights from %s", path)


def read_pointbert_state(path) -> dict:
    """Point-BERT weights from a local file: a plain state dict (`point_bert_v1.2.pt`), or a
    Point-BERT training checkpoint (`state_dict` with `module.point_encoder.` prefixes)."""
    from mcomp.io import load_tensors

    state = load_tensors(path)
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    prefix = "module.point_encoder."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state
