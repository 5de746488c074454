"""Tasks as data: each benchmark is a YAML file (shipped ones in `configs/tasks/`).

A task names its question/answer files (relative to the data root), its subsets and the modalities
each needs, the prompt template and modality order, and per evaluation mode the registered functions
that build options, extract references and score. See `configs/tasks/mcub4.yaml` for the fields.

A task file is data: the Python modules it lists under `functions:` and the "module:function"
callables it names are imported only with `allow_code=True` (`mcomp eval --allow-task-code`).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from importlib.resources import files
from pathlib import Path
from typing import Any, Mapping

from mcomp.benchmarks.mcub.prompting import MEDIA_WITHOUT_PLACEHOLDER
from mcomp.benchmarks.mcub.registry import ALLOW_CODE_HINT, resolve
from mcomp.modalities import ORDER
from mcomp.resources import read_document

MODES = ("generate", "loglik")


@dataclasses.dataclass(frozen=True)
class Subset:
    name: str
    questions: str  # path relative to the data root (or absolute)
    modalities: tuple[str, ...]  # modalities every sample of this subset needs


@dataclasses.dataclass(frozen=True)
class ModeSpec:
    scorer: str
    max_new_tokens: int = 128  # generate
    options: str | None = None  # loglik: options function name
    options_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    continuation: str = "{key}"  # loglik: continuation text per option ({key}, {letter}, {text})
    option_batch_size: int = 16  # loglik: options scored per forward pass over the cached context


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    description: str
    source: str  # the YAML file it came from
    subsets: tuple[Subset, ...]
    answers: str
    target: str
    target_params: Mapping[str, Any]
    template: str
    modality_order: tuple[str, ...]
    media_without_placeholder: str  # "ignore" (published) or "prefix" (`prompting.build_prompt`)
    modes: Mapping[str, ModeSpec]
    default_mode: str
    raw: Mapping[str, Any]  # the YAML content, recorded in results
    allow_code: bool = False  # whether the file may import the modules and module:function callables it names

    def mode(self, name: str | None) -> tuple[str, ModeSpec]:
        name = name or self.default_mode
        if name not in self.modes:
            raise ValueError(f"task {self.name!r} has no mode {name!r}; it supports: {', '.join(self.modes)}")
        return name, self.modes[name]

    def select_subsets(self, names) -> tuple[Subset, ...]:
        if not names:
            return self.subsets
        known = {s.name: s for s in self.subsets}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"task {self.name!r} has no subset(s) {unknown}; subsets: {', '.join(known)}")
        return tuple(known[n] for n in names)

    def resolve(self, kind: str, name: str):
        """A function this task names, imported only if the task was loaded with allow_code."""
        return resolve(kind, name, self.source, allow_code=self.allow_code)

    def target_function(self):
        fn = self.resolve("target", self.target)
        params = dict(self.target_params)
        return lambda entry: fn(entry, **params)


def _tasks_dir() -> Path:
    return Path(str(files("mcomp.configs").joinpath("tasks")))


def available_tasks() -> list[str]:
    d = _tasks_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_task(name_or_path: str | os.PathLike, allow_code: bool = False) -> Task:
    """A shipped task by name (`configs/tasks/<name>.yaml`) or any task YAML file by path.

    `allow_code`: let the file import the modules and module:function callables it names.
    """
    text = os.fspath(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"task file not found: {path}")
    else:
        path = _tasks_dir() / f"{text}.yaml"
        if not path.is_file():
            raise ValueError(
                f"unknown task {text!r}; available: {', '.join(available_tasks())} "
                f"(or give the path of a task .yaml file)"
            )
    return parse_task(read_document(path, "task file", dict), str(path), allow_code=allow_code)


def _require(data: Mapping, field: str, source: str, kind=None):
    if field not in data:
        raise ValueError(f"{source}: missing field {field!r}")
    value = data[field]
    if kind is not None and not isinstance(value, kind):
        raise ValueError(f"{source}: field {field!r} must be a {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


_TASK_FIELDS = {
    "name",
    "version",
    "description",
    "functions",
    "prompt",
    "answers",
    "target",
    "subsets",
    "modes",
    "default_mode",
}
_MODE_FIELDS = {"scorer", "max_new_tokens", "options", "continuation", "option_batch_size"}


def parse_task(data: Any, source: str = "task", allow_code: bool = False) -> Task:
    """A task from its YAML content; nothing is imported unless `allow_code` (see the module docstring)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: a task file must be a mapping")
    unknown = sorted(set(data) - _TASK_FIELDS)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; known: {sorted(_TASK_FIELDS)}")
    modules = data.get("functions", []) or []
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ValueError(f"{source}: field 'functions' must be a list of module names, got {modules!r}")
    if modules and not allow_code:
        raise ValueError(
            f"{source}: functions lists the Python module(s) {modules}; a task file is data and "
            f"cannot import code unless allowed: {ALLOW_CODE_HINT}"
        )
    for module in modules:  # user modules that register more functions
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"{source}: cannot import functions module {module!r}: {err}") from None

    def check(kind: str, name: str, where: str) -> None:
        resolve(kind, name, where, allow_code=allow_code)  # refuses code unless allowed, before anything runs

    name = _require(data, "name", source, str)
    version = data.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"{source}: field 'version' must be a whole number >= 0, got {version!r}")
    prompt = data.get("prompt", {}) or {}
    subsets = []
    for i, s in enumerate(_require(data, "subsets", source, list)):
        where = f"{source}: subsets[{i}]"
        if not isinstance(s, Mapping):
            raise ValueError(f"{where} must be a mapping")
        mods = _require(s, "modalities", where, list)
        subsets.append(Subset(_require(s, "name", where, str), _require(s, "questions", where, str), tuple(mods)))
    if not subsets:
        raise ValueError(f"{source}: 'subsets' is empty")
    if len({s.name for s in subsets}) != len(subsets):
        raise ValueError(f"{source}: subset names must be unique")
    modes = {}
    for mode, spec in _require(data, "modes", source, dict).items():
        where = f"{source}: modes.{mode}"
        if mode not in MODES:
            raise ValueError(f"{where}: unknown mode; expected one of {MODES}")
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where} must be a mapping")
        bad = sorted(set(spec) - _MODE_FIELDS)
        if bad:
            raise ValueError(f"{where}: unknown field(s) {bad}; known: {sorted(_MODE_FIELDS)}")
        scorer = _require(spec, "scorer", where, str)
        check("scorer", scorer, where)
        options, options_params = None, {}
        if mode == "loglik":
            opt = _require(spec, "options", where)
            if isinstance(opt, str):
                options = opt
            elif isinstance(opt, Mapping):
                options = _require(opt, "function", f"{where}.options", str)
                options_params = {k: v for k, v in opt.items() if k != "function"}
            else:
                raise ValueError(f"{where}: 'options' must be a function name or a mapping with 'function'")
            check("options", options, where)
        modes[mode] = ModeSpec(
            scorer=scorer,
            max_new_tokens=int(spec.get("max_new_tokens", 128)),
            options=options,
            options_params=options_params,
            continuation=str(spec.get("continuation", "{key}")),
            option_batch_size=int(spec.get("option_batch_size", 16)),
        )
    if not modes:
        raise ValueError(f"{source}: 'modes' is empty")
    default_mode = data.get("default_mode", next(iter(modes)))
    if default_mode not in modes:
        raise ValueError(f"{source}: default_mode {default_mode!r} is not one of its modes {list(modes)}")
    media_policy = prompt.get("media_without_placeholder", "ignore")
    if media_policy not in MEDIA_WITHOUT_PLACEHOLDER:
        raise ValueError(
            f"{source}: prompt.media_without_placeholder must be one of {MEDIA_WITHOUT_PLACEHOLDER}, "
            f"got {media_policy!r}"
        )
    target = data.get("target", "last_turn")
    target_params = {}
    if isinstance(target, Mapping):
        target_params = {k: v for k, v in target.items() if k != "function"}
        target = _require(target, "function", f"{source}: target", str)
    check("target", target, f"{source}: target")
    return Task(
        name=name,
        description=str(data.get("description", "")),
        source=source,
        subsets=tuple(subsets),
        answers=_require(data, "answers", source, str),
        target=target,
        target_params=target_params,
        template=str(prompt.get("template", "vicuna_v1")),
        modality_order=tuple(prompt.get("modality_order", ORDER)),
        media_without_placeholder=media_policy,
        modes=modes,
        default_mode=default_mode,
        raw=dict(data),
        allow_code=allow_code,
    )
