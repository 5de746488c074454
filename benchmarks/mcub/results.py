"""The results file of an evaluation run (`results.json`): one typed schema, versioned, that the
runner writes and the leaderboard reads.

`schema` names the format and its version; a reader accepts the versions it knows. Each metric row
is typed (`MetricRow`); the run's descriptive sections (model, provenance, prompt, data, versions,
...) are mappings kept as written.

Version 2 (written now) also follows lm-evaluation-harness's results layout, so that the tools of
its users read it: `results` (per task, `"<metric>,<filter>"` keys with fractions, the mode as the
filter), `groups` and `group_subtasks` (a task's mean over its subsets), `configs`, `versions`,
`n-shot`, `higher_is_better`, `n-samples` and `config`; there a subset is the task
`<task>_<subset>`. mcomp's own fields sit beside them, renamed where lm-eval uses the name: the
metric rows are `metrics`, the code versions `code_versions`. The lm-eval sections are derived
from the rows and checked against them when read. Version 1 (rows under `results`, code versions
under `versions`) is still read.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

from mcomp.resources import read_document

RESULTS_SCHEMA_V1 = "mcomp.eval.results/1"
RESULTS_SCHEMA = "mcomp.eval.results/2"
KNOWN_SCHEMAS = (RESULTS_SCHEMA_V1, RESULTS_SCHEMA)
MEAN = "mean"  # the subset name of a task's mean over its subsets
# lm-evaluation-harness's sections, derived from the metric rows (version 2)
LM_EVAL_SECTIONS = (
    "results",
    "groups",
    "group_subtasks",
    "configs",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
    "config",
)
RENAMED = {"metrics": "results", "code_versions": "versions"}  # version 2 name -> field


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
        """The file's content in the current version (with lm-evaluation-harness's sections)."""
        out = dataclasses.asdict(self)
        out["schema"] = RESULTS_SCHEMA
        out["metrics"] = [dataclasses.asdict(r) for r in self.results]
        out["code_versions"] = out.pop("versions")
        del out["results"]
        out.update(self.lm_eval_sections())
        return out

    def subtask(self, subset: str) -> str:
        """lm-eval's task name of a subset (the task itself for the mean)."""
        return self.task if subset == MEAN else f"{self.task}_{subset}"

    def lm_eval_sections(self) -> dict[str, Any]:
        """lm-evaluation-harness's results layout of the metric rows (see the module docstring)."""
        version = self.task_config.get("version", 0)
        results: dict[str, dict[str, Any]] = {}
        counts: dict[str, int] = {}
        better: dict[str, dict[str, bool]] = {}
        for row in self.results:
            name = self.subtask(row.subset)
            entry = results.setdefault(name, {"alias": row.subset if row.subset != MEAN else self.task})
            entry[f"{row.metric},{row.mode}"] = None if row.value is None else row.value / 100
            entry[f"{row.metric}_stderr,{row.mode}"] = "N/A" if row.stderr is None else row.stderr / 100
            counts[name] = max(counts.get(name, 0), row.n_samples)
            better.setdefault(name, {})[row.metric] = True
        subtasks = [n for n in results if n != self.task]
        grouped = self.task in results and bool(subtasks)
        output_type = "generate_until" if self.mode == "generate" else "loglikelihood"
        return {
            "results": results,
            "groups": {self.task: results[self.task]} if grouped else {},
            "group_subtasks": {self.task: subtasks} if grouped else {},
            "configs": {
                n: {"task": n, "group": self.task, "output_type": output_type, "metadata": {"version": version}}
                for n in subtasks or list(results)
            },
            "versions": {n: version for n in results},
            "n-shot": {n: 0 for n in results},
            "higher_is_better": better,
            "n-samples": {
                n: {"original": counts[n] if self.limit is None else None, "effective": counts[n]}
                for n in subtasks or list(results)
            },
            "config": {
                "model": "mcomp",
                "model_args": f"pretrained={self.model.get('name', '')}",
                "limit": self.limit,
                "random_seed": self.seed,
                "gen_kwargs": {"max_new_tokens": self.max_new_tokens} if self.mode == "generate" else None,
            },
        }

    @classmethod
    def from_dict(cls, data: Any, source: str) -> ResultsFile:
        """A results file's content, of any known version."""
        cls._check_schema(data, source)
        if data["schema"] == RESULTS_SCHEMA_V1:
            return cls.from_fields(data, source)
        fields = {k: v for k, v in data.items() if k not in LM_EVAL_SECTIONS and k not in RENAMED}
        for name, field_name in RENAMED.items():
            if name not in data:
                raise ValueError(f"{source}: no {name!r} section")
            fields[field_name] = data[name]
        parsed = cls.from_fields({**fields, "schema": RESULTS_SCHEMA}, source, rows_name="metrics")
        derived = parsed.lm_eval_sections()
        for name in LM_EVAL_SECTIONS:  # never a file whose two views of the scores disagree
            if data.get(name) != derived[name]:
                raise ValueError(
                    f"{source}: section {name!r} does not follow from the metric rows ('metrics'); was the file edited?"
                )
        return parsed

    @staticmethod
    def _check_schema(data: Any, source: str) -> None:
        if not isinstance(data, Mapping) or data.get("schema") not in KNOWN_SCHEMAS:
            found = data.get("schema") if isinstance(data, Mapping) else None
            raise ValueError(
                f"{source}: not an mcomp eval results file of a known version (schema {found!r}; "
                f"known: {', '.join(KNOWN_SCHEMAS)})"
            )

    @classmethod
    def from_fields(cls, data: Any, source: str, rows_name: str = "results") -> ResultsFile:
        """From the fields themselves (metric rows under `results`, code versions under `versions`, as the
        runner gathers them and version 1 stored them), checked."""
        cls._check_schema(data, source)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}")
        rows = data.get("results", [])
        if not isinstance(rows, list):
            raise ValueError(f"{source}: {rows_name!r} must be a list")
        fields = dict(data)
        fields["results"] = tuple(MetricRow.from_dict(r, f"{source}: {rows_name}[{i}]") for i, r in enumerate(rows))
        for name in ("model", "provenance", "prompt", "data", "task_config", "versions", "run"):
            if fields.get(name) is None:
                fields[name] = {}
            elif not isinstance(fields[name], Mapping):
                raise ValueError(f"{source}: {name!r} must be an object")
        return cls(**fields)

    @classmethod
    def read(cls, path: str | os.PathLike) -> ResultsFile:
        return cls.from_dict(read_document(path, "results file", dict), str(path))
