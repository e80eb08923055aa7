"""Drop-in backends: ferromerge's kernels behind other libraries' merge APIs.

* :mod:`ferromerge.compat.peft` — the functions of ``peft.utils.merge_utils`` (same names, signatures and
  semantics) on torch tensors.
* :mod:`ferromerge.compat.mergekit` — ``register()`` swaps mergekit 0.1.5's merge methods for ferromerge-backed
  ones, so ``mergekit-yaml`` pipelines and ``mergekit.merge.run_merge`` run on our kernels; ``unregister()``
  restores mergekit's own.

Neither module imports torch, peft or mergekit at import time; each needs them only when called.
"""
