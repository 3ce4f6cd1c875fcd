"""LoRA forwards on merged weights: a plain layer on W + s·B·A instead of peft's W x + s·B (A x).

LoRA (Hu et al., 2021, arXiv:2106.09685, eq. 3) writes an adapted layer as h = W0 x + ΔW x with ΔW = s·B A; the
merged form runs the one product (W0 + ΔW) x, the same function, with the sums rounded in another order (outputs
agree to float32 rounding, ``tests/test_lora_merge.py``). peft runs the base layer, then the adapter's two small
products, through a Python wrapper per layer; on a small network that wrapper, not the arithmetic, is most of an
adapter's cost (BENCHMARKS.md: a LoRA student's forward against a full student's).

:class:`MergedLora` drives a weight-tied plain copy of the wrapped network (``models.tied_plain_net``): while one of
its adapters is active, each targeted plain layer runs on W + ΔW (peft's own ``get_delta_weight``), built for its
forward and dropped after it, so at most one merged weight exists at a time.

With gradient, the layer is one autograd node (:class:`_FactoredLinear`, :class:`_FactoredConv2d`): its backward
takes the input's gradient through the merged weight, as a plain layer's does, and the adapter's gradients through
the factors, never forming the full-size weight gradient dL/dW (out × in per layer) that autograd through ΔW would:
with u = A x and v = Bᵀ dy, dL/dB = s dy uᵀ and dL/dA = s v xᵀ (a convolution's A is a k×k convolution to r
channels and B a 1×1 one, so u and v are convolutions and dL/dA the k×k weight gradient of v against x). It keeps x
and the factors for the backward, not a merged copy, and recomputes W + ΔW there.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
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
            # An instance attribute is found before the class's forward: nn.Module.__call__ runs this one.
            layer.forward = functools.partial(self._forward, layer)

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

    def _forward(self, layer: nn.Module, x: Tensor) -> Tensor:
        adapter = self._adapter
        if adapter is None:
            return type(layer).forward(layer, x)
        lora = self.layers[layer]
        if torch.is_grad_enabled() and _factorable(layer, x):
            fn = _FactoredConv2d if isinstance(layer, nn.Conv2d) else _FactoredLinear
            return fn.apply(x, layer._parameters["weight"], layer.bias, lora.lora_A[adapter].weight,
                            lora.lora_B[adapter].weight, lora, adapter, layer)
        # An instance attribute is found before nn.Module.__getattr__ reads _parameters: the layer's own forward
        # (F.linear / F.conv2d on self.weight) uses the merged tensor; the Parameter itself is untouched.
        layer.__dict__["weight"] = layer._parameters["weight"] + lora.get_delta_weight(adapter)
        try:
            return type(layer).forward(layer, x)
        finally:
            layer.__dict__.pop("weight", None)


def _factorable(layer: nn.Module, x: Tensor) -> bool:
    """The factored backward applies: a plain Linear, or a Conv2d with zero padding and one group, on a frozen base,
    outside autocast (whose casts a hand-written backward would have to repeat)."""
    if type(layer) is nn.Conv2d:
        if layer.padding_mode != "zeros" or layer.groups != 1 or isinstance(layer.padding, str):
            return False
    elif type(layer) is not nn.Linear:
        return False
    frozen = not layer._parameters["weight"].requires_grad and (layer.bias is None or not layer.bias.requires_grad)
    return frozen and not torch.is_autocast_enabled(x.device.type)


def _merged_weight(layer: nn.Module, lora: nn.Module, adapter: str) -> Tensor:
    return layer._parameters["weight"] + lora.get_delta_weight(adapter)


class _FactoredLinear(torch.autograd.Function):
    """y = x (W + s B A)ᵀ + b, differentiable in x, A (r × in) and B (out × r); W and b frozen."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, lora: nn.Module,
                adapter: str, layer: nn.Module) -> Tensor:
        ctx.save_for_backward(x, A, B)
        ctx.lora, ctx.adapter, ctx.layer = lora, adapter, layer
        return F.linear(x, _merged_weight(layer, lora, adapter), bias)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, A, B = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dx = dy @ _merged_weight(ctx.layer, ctx.lora, ctx.adapter) if need_x else None
        dA = dB = None
        if need_A or need_B:
            s = ctx.lora.scaling[ctx.adapter]
            x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # (T, in), (T, out)
            if need_B:
                dB = (dy2.t() @ (x2 @ A.t())) * s  # (out, T) (T, r)
            if need_A:
                dA = ((dy2 @ B).t() @ x2) * s  # (r, T) (T, in)
        return dx, None, None, dA, dB, None, None, None


class _FactoredConv2d(torch.autograd.Function):
    """y = conv(x, W + s B∘A) + b for a k×k convolution with A: (r, in, k, k) and B: (out, r, 1, 1) (peft's Conv2d
    LoRA), differentiable in x, A and B; W and b frozen."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, lora: nn.Module,
                adapter: str, layer: nn.Module) -> Tensor:
        ctx.save_for_backward(x, A, B)
        ctx.lora, ctx.adapter, ctx.layer = lora, adapter, layer
        return layer._conv_forward(x, _merged_weight(layer, lora, adapter), bias)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, A, B = ctx.saved_tensors
        layer = ctx.layer
        need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        geometry = (layer.stride, layer.padding, layer.dilation, False, (0, 0), 1)
        dx = dA = dB = None
        if need_x:
            W = _merged_weight(layer, ctx.lora, ctx.adapter)
            dx = torch.ops.aten.convolution_backward(dy, x, W, None, *geometry, (True, False, False))[0]
        if need_A or need_B:
            s = ctx.lora.scaling[ctx.adapter]
            if need_B:  # dL/dB[o, r] = s Σ dy[b, o, h, w] u[b, r, h, w]: the 1×1 weight gradient, u = conv(x, A)
                u = F.conv2d(x, A, None, layer.stride, layer.padding, layer.dilation)
                dB = torch.ops.aten.convolution_backward(dy, u, B, None, (1, 1), (0, 0), (1, 1), False, (0, 0), 1,
                                                         (False, True, False))[1] * s
            if need_A:  # v = Bᵀ dy (1×1), then the k×k weight gradient of conv(x, A) against v
                v = F.conv2d(dy, B.transpose(0, 1))
                dA = torch.ops.aten.convolution_backward(v, x, A, None, *geometry, (False, True, False))[1] * s
        return dx, None, None, dA, dB, None, None, None
