"""``--init_reg``: keep the transformer blocks near their starting (pretrained) weights (LAWSON, model.md §12).

    L_reg = init_reg * sum_{p in transformer.h parameters} ||theta_p - theta0_p||_F

a per-tensor Frobenius norm, **not squared** (as the originals). theta0 is a copy taken when the regulariser is built.
Buffers, ``ln_f``, ``wpe`` and ``wte`` are not included. At theta = theta0 the norm's gradient is 0 (torch's
subgradient), not NaN, so the first step is well defined.
"""
from __future__ import annotations

import torch
from torch import nn


class InitReg:
    """The ``--init_reg`` term over the parameters of ``model`` named ``prefix``*, measured from copies taken at
    construction."""

    def __init__(self, model: nn.Module, weight: float, prefix: str = "transformer.h."):
        self.weight = float(weight)
        self.params = [(n, p) for n, p in model.named_parameters() if n.startswith(prefix)]
        if not self.params:
            raise ValueError(f"no parameters named {prefix}* to regularise")
        self.init = [p.detach().clone() for _, p in self.params]
        # what --resume compares: a run resumed after its LM files (or --load_checkpoint) changed would otherwise
        # measure the distance from other reference weights than the run started with
        from decision_transformer.checkpoint import weights_digest

        self.fingerprint = weights_digest({n: t for (n, _), t in zip(self.params, self.init)})

    def distance(self) -> torch.Tensor:
        """sum_p ||theta_p - theta0_p||_F (unweighted). Two fused multi-tensor kernels instead of one subtraction and
        one norm per tensor (GPT-2: 144 tensors)."""
        params = [p for _, p in self.params]
        return torch.stack(torch._foreach_norm(torch._foreach_sub(params, self.init))).sum()

    def loss(self) -> torch.Tensor:
        """``weight * distance()``: the regulariser as added to the loss (scalar tensor)."""
        return self.weight * self.distance()
