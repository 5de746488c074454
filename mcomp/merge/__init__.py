"""Parameter merging: task arithmetic, TIES, DARE, PCB — exact, streaming, LoRA-aware.

Semantics: the project spec `merging.md` (the papers' released code). Entry points:

* `merge_state_dicts(base, models, method, **params)` — state dicts in memory, returns θ.
* `merge_task_vectors(deltas, method, **params)` — task vectors in, merged delta out.
* `merge_checkpoints(base, models, out, method, **params)` — safetensors on disk, streamed.
* `mcomp.merge.lora` — LoRA adapters (ΔW space, fold or re-factorise, exact linear terms).
* `mcomp.merge.search` — per-model coefficient search (CMA-ES) on a validation objective.
"""

from mcomp.merge.api import merge_checkpoints, merge_state_dicts, merge_task_vectors
from mcomp.merge.registry import MergeMethod, MethodParams, available_methods, get_method, make_params, register
from mcomp.merge.streaming import MergeEngine, MergeReport

__all__ = [
    "merge_state_dicts",
    "merge_task_vectors",
    "merge_checkpoints",
    "MergeEngine",
    "MergeReport",
    "MergeMethod",
    "MethodParams",
    "available_methods",
    "get_method",
    "make_params",
    "register",
]
