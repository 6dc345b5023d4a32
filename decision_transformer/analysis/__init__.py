"""The pre-training paper's analyses (Takagi 2022) as library code; ``analysis/`` and ``mine/`` hold thin scripts.

Modules: ``runs`` (find and load checkpoints, datasets and batches), ``activations`` (per-block hooks), ``cka``,
``mine`` (the MINE estimator), ``mi`` (mutual-information experiments), ``params`` (parameter similarity), ``grads``
(per-sample gradients, confusion, norms), ``attention`` (attention distance), ``scores`` (normalised-score tables),
``curves`` (learning curves), ``report`` (the whole suite and its markdown report).
"""
