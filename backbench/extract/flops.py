"""A backbone's forward FLOPs per image, counted once per extraction group for the report's cost plot.

Counted with torch's own counter (:class:`torch.utils.flop_counter.FlopCounterMode`), which
counts a multiply-add as 2 FLOPs and counts matrix products and convolutions (``mm``,
``addmm``, ``bmm``, ``convolution``, attention), not element-wise operations: the convention
of fvcore's GMACs times two (timm's ``resnet18`` at 224 px: 1.82 GMACs, 3.63 GFLOPs here).
The forward runs first on the ``meta`` device (shapes only, no arithmetic: milliseconds even for
large models) with the model's parameters swapped for meta tensors by
:func:`torch.func.functional_call`; a forward that cannot run on meta tensors (data-dependent
code) is counted on one real blank image on the CPU. A forward that fails both ways is ``None``
("n/a" in the report), never a failed extraction. Machine-independent, unlike images/s.
"""

from __future__ import annotations

import warnings
from typing import Any

from backbench.extract.backbones import Backbone


def forward_gflops(backbone: Backbone) -> float | None:
    """Forward GFLOPs (1e9 FLOPs, a multiply-add counting 2) of one image at the backbone's
    input size, batch 1; None where torch's counter cannot run the forward."""
    for count in (_meta_flops, _cpu_flops):
        try:
            return count(backbone) / 1e9
        except Exception:  # noqa: BLE001 - any failure means "not countable this way": try the next
            continue
    return None


def _counted(run: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with FlopCounterMode(display=False) as counter:
            run()
    return int(counter.get_total_flops())


def _meta_flops(backbone: Backbone) -> int:
    """FLOPs of the forward on the meta device: parameters and buffers replaced by meta tensors."""
    import torch
    from torch.func import functional_call

    wrapper = _Forward(backbone)
    state = {name: torch.empty_like(t, device="meta")
             for name, t in [*wrapper.named_parameters(), *wrapper.named_buffers()]}
    x = torch.zeros(1, *backbone.preprocess.input_size, device="meta")
    with torch.no_grad():
        return _counted(lambda: functional_call(wrapper, state, (x,), strict=False))


def _cpu_flops(backbone: Backbone) -> int:
    """FLOPs of the forward of one blank image on the CPU (where the model is between runs), with
    attention run by its plain matrix products: fused kernels (PyTorch's multi-head attention fast
    path, fused CPU attention) would go uncounted."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = torch.zeros(1, *backbone.preprocess.input_size)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            return _counted(lambda: backbone.forward(x))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _Forward(backbone: Backbone):  # noqa: N802 - a module class made late: torch is imported lazily
    """The backbone's ``forward_fn`` as a module holding the model, so that
    :func:`torch.func.functional_call` can swap the model's tensors for the call."""
    import torch

    class Forward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = backbone.model

        def forward(self, x):
            return backbone.forward_fn(self.model, x)

    return Forward()
