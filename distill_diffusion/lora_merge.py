"""LoRA forwards on merged weights: a plain layer on W + s·B·A instead of peft's W x + s·B (A x).

LoRA (Hu et al., 2021, arXiv:2106.09685, eq. 3) writes an adapted layer as h = W0 x + ΔW x with ΔW = s·B A; the
merged form runs the one product (W0 + ΔW) x, the same function, with the sums rounded in another order (outputs
agree to float32 rounding, ``tests/test_lora_merge.py``). peft runs the base layer, then the adapter's two small
products, through a Python wrapper per layer; on a small network that wrapper, not the arithmetic, is most of an
adapter's cost (BENCHMARKS.md: a LoRA student's forward against a full student's).

:class:`MergedLora` drives a weight-tied plain copy of the wrapped network (``models.tied_plain_net``): while one of
its adapters is active, a forward pre-hook on each targeted plain layer sets its ``weight`` to W + ΔW (peft's own
``get_delta_weight``) and the forward hook drops it again, so without gradient at most one merged weight exists at a
time. With gradient, autograd keeps each merged weight for the backward (a copy of the targeted weights), and the
gradient reaches A and B through ΔW.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


def unsupported_reason(layer: nn.Module, adapter: str) -> str | None:
    """Why ``layer``'s ``adapter`` cannot run merged (None: it can): only plain LoRA on Linear / Conv2d in float32,
    without dropout (it applies to the adapter's input alone), DoRA or an adapter bias."""
    from peft.tuners.lora.layer import Conv2d, Linear

    if type(layer) not in (Linear, Conv2d):
        return f"{type(layer).__name__} layers"
    if not isinstance(layer.lora_dropout[adapter], nn.Identity):
        return "lora_dropout"
    if layer.use_dora.get(adapter, False) or getattr(layer, "lora_bias", {}).get(adapter, False):
        return "DoRA or an adapter bias"
    if layer.get_base_layer().weight.dtype != torch.float32:
        return "a half-precision base (the merged sum would round the adapter's update away)"
    return None


class MergedLora:
    """Run ``wrapped``'s LoRA adapters through ``plain``, a weight-tied plain copy of it (the same base tensors)."""

    def __init__(self, wrapped: nn.Module, plain: nn.Module) -> None:
        from peft.tuners.lora.layer import LoraLayer

        self.layers: dict[nn.Module, nn.Module] = {}  # plain layer -> its peft LoRA layer in ``wrapped``
        for name, module in wrapped.named_modules():
            if isinstance(module, LoraLayer):
                self.layers[plain.get_submodule(name)] = module
        self.plain = plain
        self._adapter: str | None = None
        for layer in self.layers:
            layer.register_forward_pre_hook(self._merge)
            layer.register_forward_hook(self._unmerge)

    def unsupported(self, adapter: str) -> str | None:
        """Why ``adapter`` cannot run merged on some layer, or None."""
        for layer in self.layers.values():
            reason = unsupported_reason(layer, adapter)
            if reason is not None:
                return reason
        return None

    @contextlib.contextmanager
    def active(self, adapter: str) -> Iterator[nn.Module]:
        """``plain`` computing the wrapped network with ``adapter`` on, for the forwards run inside."""
        self._adapter = adapter
        try:
            yield self.plain
        finally:
            self._adapter = None
            for layer in self.layers:  # a forward cut short (features' early stop) skips its layers' forward hooks
                layer.__dict__.pop("weight", None)

    def _merge(self, layer: nn.Module, _args: Any) -> None:
        if self._adapter is not None:
            lora = self.layers[layer]
            # An instance attribute is found before nn.Module.__getattr__ reads _parameters: the layer's own forward
            # (F.linear / F.conv2d on self.weight) then uses the merged tensor; the Parameter itself is untouched.
            layer.__dict__["weight"] = layer._parameters["weight"] + lora.get_delta_weight(self._adapter)

    @staticmethod
    def _unmerge(layer: nn.Module, _args: Any, _out: Tensor) -> None:
        layer.__dict__.pop("weight", None)
