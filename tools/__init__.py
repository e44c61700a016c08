"""Repository tools for the GPU work: the static compile check, the one-command GPU proof and the
training experiment (README, "GPU"). Run from the repository root as ``python -m tools.<name>``.

They live here rather than in the ``normattn`` package because they are about this repository and a
lent GPU machine, not about attention: ``gpu_static`` drives Triton's compiler with a stand-in
driver, ``gpu_check`` and ``gpu_experiment`` orchestrate subprocesses within a lease's limits.
"""
