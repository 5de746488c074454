"""The merge methods, one small unit each: the task-arithmetic family (`family`: task arithmetic,
linear, TIES, DARE) and PCB-Merging (`pcb`). They register through the `mcomp.merge_methods` entry
points (pyproject.toml); the merge engine (`mcomp.merge.streaming`) runs them."""
