"""The results file of an evaluation run (`results.json`): one typed schema, versioned, that the
runner writes and the leaderboard reads.

`schema` names the format and its version ("mcomp.eval.results/1"); a reader accepts the versions
it knows. Each metric row is typed (`MetricRow`); the run's descriptive sections (model,
provenance, prompt, data, versions, ...) are mappings kept as written.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

from mcomp.resources import read_document

RESULTS_SCHEMA = "mcomp.eval.results/1"
KNOWN_SCHEMAS = (RESULTS_SCHEMA,)


@dataclasses.dataclass(frozen=True)
class MetricRow:
    task: str
    subset: str  # a subset's name, or "mean" over the subsets
    mode: str  # "generate" | "loglik"
    metric: str  # e.g. "accuracy", "accuracy_norm"
    value: float | None  # percent; None when no sample was scored
    stderr: float | None = None
    n_samples: int = 0
    n_correct: int = 0
    n_errors: int = 0
    n_missing_answer: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> MetricRow:
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}")
        for name in ("task", "subset", "mode", "metric", "value"):
            if name not in data:
                raise ValueError(f"{where} has no {name!r} field")
        for name in ("task", "subset", "mode", "metric"):
            if not isinstance(data[name], str):
                raise ValueError(f"{where}.{name} must be a string, got {data[name]!r}")
        for name in ("value", "stderr"):
            v = data.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ValueError(f"{where}.{name} must be a finite number or null, got {v!r}")
        for name in ("n_samples", "n_correct", "n_errors", "n_missing_answer"):
            v = data.get(name, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{where}.{name} must be a count, got {v!r}")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class ResultsFile:
    schema: str
    results: tuple[MetricRow, ...]
    task: str = ""
    mode: str = ""
    description: str = ""
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # name, class, modalities, dtype
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # how the model was made
    prompt: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # files and their sha256
    task_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int | None = None
    limit: int | None = None
    max_new_tokens: int | None = None
    versions: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    run: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["results"] = [dataclasses.asdict(r) for r in self.results]
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str) -> ResultsFile:
        if not isinstance(data, Mapping) or data.get("schema") not in KNOWN_SCHEMAS:
            found = data.get("schema") if isinstance(data, Mapping) else None
            raise ValueError(
                f"{source}: not an mcomp eval results file of a known version (schema {found!r}; "
                f"known: {', '.join(KNOWN_SCHEMAS)})"
            )
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}")
        rows = data.get("results", [])
        if not isinstance(rows, list):
            raise ValueError(f"{source}: 'results' must be a list")
        fields = dict(data)
        fields["results"] = tuple(MetricRow.from_dict(r, f"{source}: results[{i}]") for i, r in enumerate(rows))
        for name in ("model", "provenance", "prompt", "data", "task_config", "versions", "run"):
            if fields.get(name) is None:
                fields[name] = {}
            elif not isinstance(fields[name], Mapping):
                raise ValueError(f"{source}: {name!r} must be an object")
        return cls(**fields)

    @classmethod
    def read(cls, path: str | os.PathLike) -> ResultsFile:
        return cls.from_dict(read_document(path, "results file", dict), str(path))
