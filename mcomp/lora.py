"""Routed LoRA: named low-rank adapters on the LLM's linear layers, chosen per token.

Every targeted `nn.Linear` becomes a `RoutedLinear` holding any number of named adapters
(A: [r, in], B: [out, r], scaling alpha/r). A *route* says which adapters, with which
coefficients, a group of tokens goes through:

    routes = {"text": [("text", 1.0)], "image": [("image", 1.0)]}      # DAMC-trained image model
    routes = {"text": [("text-image", 0.5), ("text-audio", 0.5)]}       # NaiveMC, linear merge

A token of modality m takes route m if there is one, else the text route. Each group of tokens is
gathered, goes through its adapters only (one matmul pair: the adapters of a route are stacked
along the rank), and is scattered back; attention stays joint because only the projections are
routed. Tokens of modalities absent from the input cost nothing, and a linear merge
y = Wx + sum_i c_i s_i B_i A_i x is exact without ever forming a dense delta (except for inference
on small layers, where a dense weight per route is faster: `DENSE_ROUTES_MAX_WEIGHTS`).

During generation the decode steps see one new token at a time, which does not match the routed
prompt: those tokens take the text route, as in the published models.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch
from torch import nn

from mcomp.configuration import JsonConfig
from mcomp.io import check_finite
from mcomp.resources import load_config

TEXT_ROUTE = "text"
# Inference on layers up to this many weights runs each route through its own dense weight
# W + sum_i c_i s_i B_i A_i: one matmul per group of tokens instead of the base matmul, two low-rank
# ones and their gathers (the demo's DAMC all-four model on MCUB-4: 2.9 s -> 2.3 s). Larger layers keep the
# low-rank path, which needs no copy of W per route.
DENSE_ROUTES_MAX_WEIGHTS = 1 << 20
FAMILIES = load_config("llm", "families.yaml")  # model_type -> {lora_targets}
LLAMA_TARGETS = tuple(FAMILIES["llama"]["lora_targets"])


@dataclasses.dataclass
class LoraSpec(JsonConfig):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = dataclasses.field(default_factory=lambda: list(LLAMA_TARGETS))

    def __post_init__(self):
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1 (got r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout})"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class RoutingState:
    """Shared by all routed layers of one model: the routes, and the route of each position."""

    def __init__(self):
        self.routes: dict[str, list[tuple[str, float]]] = {}
        self.route_names: list[str] | None = None  # route name per route id of `route_ids`
        self.route_ids: torch.Tensor | None = None  # [B, T] while a routed forward runs
        self._groups_of: torch.Tensor | None = None  # the route_ids the cached groups were made for
        self._groups: list = []
        self._inverse: torch.Tensor | None = None  # token order from the groups' concatenated rows
        self._masks: dict[tuple, torch.Tensor] = {}  # rank_weights', for the current groups

    def text_terms(self) -> list[tuple[str, float]]:
        return self.routes.get(TEXT_ROUTE, [])

    def terms(self, route: str) -> list[tuple[str, float]]:
        return self.routes.get(route, self.text_terms())

    def set_routes(self, routes: dict[str, list[tuple[str, float]]]) -> None:
        self.routes = routes
        self._groups_of = None

    def groups(self, x: torch.Tensor):
        """[(terms, flat token index or None for all)] for the tokens of `x` ([B, T, in]).

        Every routed layer of a forward sees the same positions: the groups are computed once.
        """
        ids = self.route_ids
        if ids is None or tuple(ids.shape) != tuple(x.shape[:2]):
            return [(self.text_terms(), None)]
        if self._groups_of is not ids:
            self._groups = self._make_groups(ids)
            self._groups_of = ids
            self._inverse = None
            self._masks = {}
            if len(self._groups) > 1:
                perm = torch.cat([index for _, index in self._groups])
                self._inverse = torch.empty_like(perm)
                self._inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return self._groups

    def rank_weights(self, layout: tuple[tuple[int, int, float], ...], dtype: torch.dtype) -> torch.Tensor:
        """(tokens, Σ ranks): a column's factor where it belongs to the token's group, else 0. `layout`:
        (group, rank, factor) of each adapter's columns, side by side. Made once per forward and layout."""
        key = (layout, dtype)
        kept = self._masks.get(key)
        if kept is None:
            group = torch.empty(self.route_ids.numel(), dtype=torch.long, device=self.route_ids.device)
            for g, (_, index) in enumerate(self._groups):
                group[index] = g
            owner = torch.cat([torch.full((r,), g, dtype=torch.long, device=group.device) for g, r, _ in layout])
            factor = torch.cat([torch.full((r,), f, dtype=dtype, device=group.device) for _, r, f in layout])
            self._masks[key] = kept = (group.unsqueeze(1) == owner.unsqueeze(0)).to(dtype) * factor
        return kept

    def in_token_order(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Rows computed per group of the current forward (the groups partition the tokens), back
        in token order with one gather (index_add on CPU loops per row)."""
        return torch.cat(parts).index_select(0, self._inverse)

    def _make_groups(self, ids: torch.Tensor):
        by_terms: dict[tuple, list[int]] = {}
        present = torch.unique(ids).tolist()
        for rid in present:
            key = tuple(self.terms(self.route_names[rid]))
            by_terms.setdefault(key, []).append(rid)
        if len(by_terms) == 1:
            return [(list(next(iter(by_terms))), None)]
        flat = ids.reshape(-1)
        out = []
        for key, rids in by_terms.items():
            mask = flat == rids[0]
            for rid in rids[1:]:
                mask |= flat == rid
            out.append((list(key), mask.nonzero().squeeze(1)))
        return out


class RoutedLinear(nn.Module):
    """A frozen base linear layer plus named LoRA adapters applied per route."""

    def __init__(self, base_layer: nn.Linear, state: RoutingState):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self._state = [state]  # in a list: not a submodule, not in the state dict
        self._dense: dict[tuple, tuple] = {}  # route terms -> (stamp of the weights, dense weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        zero_b: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        """peft's default init: A kaiming-uniform(a=sqrt 5), B zero (so a new adapter changes nothing)."""
        w = self.base_layer.weight
        a = torch.empty(r, self.in_features, dtype=torch.float32)
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform with a=sqrt(5) on fan_in
        a.uniform_(-bound, bound, generator=generator)
        b = torch.zeros(self.out_features, r, dtype=torch.float32)
        if not zero_b:
            b.uniform_(-bound, bound, generator=generator)
        self.lora_A[name] = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_B[name] = nn.Parameter(b.to(device=w.device, dtype=w.dtype))
        self.scaling[name] = alpha / r
        self.dropout[name] = dropout

    def remove_adapter(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]
        self.scaling.pop(name)
        self.dropout.pop(name)

    def delta_weight(self, terms: Iterable[tuple[str, float]]) -> torch.Tensor:
        """sum_i c_i s_i B_i A_i as a dense [out, in] float32 matrix."""
        out = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.weight.device)
        for name, coef in terms:
            out += (coef * self.scaling[name]) * (self.lora_B[name].float() @ self.lora_A[name].float())
        return out

    def _stacked(self, terms):
        """The adapters of a route stacked along the rank: one matmul pair for any number of them."""
        names = [n for n, c in terms if c != 0.0 and n in self.lora_A]
        if not names:
            return None
        coefs = {n: c for n, c in terms}
        if len(names) == 1:
            n = names[0]
            return self.lora_A[n], self.lora_B[n] * (coefs[n] * self.scaling[n]), self.dropout[n]
        a = torch.cat([self.lora_A[n] for n in names], dim=0)
        b = torch.cat([self.lora_B[n] * (coefs[n] * self.scaling[n]) for n in names], dim=1)
        return a, b, max(self.dropout[n] for n in names)

    def _delta(self, x: torch.Tensor, stacked) -> torch.Tensor:
        a, b, p = stacked
        x = x.to(a.dtype)
        if p > 0 and self.training:
            x = nn.functional.dropout(x, p)
        return (x @ a.t()) @ b.t()

    def dense_weight(self, terms) -> torch.Tensor:
        """W + sum_i c_i s_i B_i A_i for inference, kept until a weight it was made from changes:
        in place (its version counter moves), replaced (its identity does) or moved to another
        device or dtype (its storage does)."""
        names = [n for n, c in terms if c != 0.0 and n in self.lora_A]
        tensors = [self.base_layer.weight] + [t for n in names for t in (self.lora_A[n], self.lora_B[n])]
        stamp = tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors) + tuple(
            self.scaling[n] for n in names
        )
        key = tuple(terms)
        kept = self._dense.get(key)
        if kept is None or kept[0] != stamp:
            w = self.base_layer.weight
            with torch.no_grad():
                dense = (w.float() + self.delta_weight([(n, c) for n, c in terms if n in names])).to(w.dtype)
            self._dense[key] = kept = (stamp, dense)
        return kept[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lora_A:
            return self.base_layer(x)
        groups = self._state[0].groups(x)
        if not torch.is_grad_enabled() and self.in_features * self.out_features <= DENSE_ROUTES_MAX_WEIGHTS:
            return self._forward_dense(x, groups)
        y = self.base_layer(x)
        if len(groups) == 1 and groups[0][1] is None:
            stacked = self._stacked(groups[0][0])
            return y if stacked is None else y + self._delta(x, stacked).to(y.dtype)
        flat_x = x.reshape(-1, x.shape[-1])
        flat_y = y.reshape(-1, y.shape[-1])
        columns = [
            (g, n, c * self.scaling[n])
            for g, (terms, _) in enumerate(groups)
            for n, c in terms
            if c != 0.0 and n in self.lora_A
        ]
        if not (self.training and any(self.dropout[n] > 0 for _, n, _ in columns)):
            delta = self._routed_delta(flat_x, columns)
            return y if delta is None else (flat_y + delta.to(y.dtype)).view_as(y)
        parts = []  # dropout draws per group, as each group's own forward would
        for terms, index in groups:
            stacked = self._stacked(terms)
            if stacked is None or index.numel() == 0:
                parts.append(flat_y.new_zeros(index.numel(), flat_y.shape[1]))
            else:
                parts.append(self._delta(flat_x.index_select(0, index), stacked).to(y.dtype))
        return (flat_y + self._state[0].in_token_order(parts)).view_as(y)

    def _routed_delta(self, flat_x: torch.Tensor, columns: list[tuple[int, str, float]]) -> torch.Tensor | None:
        """Every token's LoRA update from its own route's adapters, in one matmul pair: the adapters of
        all groups side by side (`columns`: group, adapter, coefficient·scaling), and between the two
        matmuls each token's rank columns weighted by their factor in its group, 0 in the others (no
        gathers of token rows; the zeros add nothing to the sums)."""
        if not columns:
            return None
        a = torch.cat([self.lora_A[n] for _, n, _ in columns], dim=0)
        b = torch.cat([self.lora_B[n] for _, n, _ in columns], dim=1)
        layout = tuple((g, self.lora_A[n].shape[0], f) for g, n, f in columns)
        weights = self._state[0].rank_weights(layout, a.dtype)
        return ((flat_x.to(a.dtype) @ a.t()) * weights) @ b.t()

    def _forward_dense(self, x: torch.Tensor, groups) -> torch.Tensor:
        """Each group of tokens through its route's dense weight: one matmul per group."""
        bias = self.base_layer.bias
        if len(groups) == 1 and groups[0][1] is None:
            return nn.functional.linear(x, self.dense_weight(groups[0][0]), bias)
        flat_x = x.reshape(-1, x.shape[-1])
        parts = [
            nn.functional.linear(flat_x.index_select(0, index), self.dense_weight(terms), bias)
            for terms, index in groups
        ]
        return self._state[0].in_token_order(parts).view(*x.shape[:-1], self.out_features)


def family_targets(llm: nn.Module) -> list[str]:
    """The LoRA target modules of the LLM's family (`configs/llm/families.yaml`, by model_type)."""
    model_type = llm.config.get_text_config().model_type
    if model_type not in FAMILIES:
        raise ValueError(
            f"no default LoRA target modules for a {model_type!r} LLM (known: {', '.join(FAMILIES)}); "
            f"give them (TrainConfig.target_modules, e.g. its attention and MLP projections)"
        )
    return list(FAMILIES[model_type]["lora_targets"])


def inject_routed_layers(llm: nn.Module, targets: Iterable[str], state: RoutingState) -> list[str]:
    """Replace each targeted nn.Linear (matched by the last name component) by a RoutedLinear. A
    target that matches no linear layer is an error: a partial match would adapt fewer layers than
    asked for, silently (e.g. Llama's names on Phi-3's fused projections)."""
    targets = set(targets)
    replaced, matched = [], set()
    for path, module in list(llm.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear) and not isinstance(child, RoutedLinear):
                setattr(module, child_name, RoutedLinear(child, state))
                replaced.append(f"{path}.{child_name}" if path else child_name)
                matched.add(child_name)
    unmatched = sorted(targets - matched)
    if unmatched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in llm.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"LoRA target module(s) {unmatched} match no linear layer of this "
            f"{llm.config.get_text_config().model_type} LLM; its linear layers: {linear}"
        )
    return replaced


def routed_layers(llm: nn.Module) -> dict[str, RoutedLinear]:
    return {path: m for path, m in llm.named_modules() if isinstance(m, RoutedLinear)}


def fold_into_base(llm: nn.Module, deltas: dict[str, torch.Tensor], origin: str = "") -> None:
    """Add dense deltas {routed layer path: dW} into the base weights, in float32, cast back; a sum
    that overflows the weights' dtype is refused, naming the tensor and `origin` (the inputs)."""
    layers = routed_layers(llm)
    with torch.no_grad():
        for path, delta in deltas.items():
            w = layers[path].base_layer.weight
            folded = (w.float() + delta.float()).to(w.dtype)
            check_finite(f"{path}.weight", folded, "folded LLM", origin)
            w.copy_(folded)


def fold_route(llm: nn.Module, terms: list[tuple[str, float]]) -> None:
    """Add sum_i c_i s_i B_i A_i into each base weight (the dense equivalent of a linear route)."""
    fold_into_base(llm, {path: layer.delta_weight(terms) for path, layer in routed_layers(llm).items()})
