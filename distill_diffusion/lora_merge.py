"""LoRA forwards on merged weights: a plain layer on W + s·B·A instead of peft's W x + s·B (A x).

LoRA (Hu et al., 2021, arXiv:2106.09685, eq. 3) writes an adapted layer as h = W0 x + ΔW x with ΔW = s·B A; the
merged form runs the one product (W0 + ΔW) x, the same function, with the sums rounded in another order (outputs
agree to float32 rounding, ``tests/test_lora_merge.py``). peft runs the base layer, then the adapter's two small
products, through a Python wrapper per layer; on a small network that wrapper, not the arithmetic, is most of an
adapter's cost (BENCHMARKS.md: a LoRA student's forward against a full student's).

:class:`MergedLora` drives a weight-tied plain copy of the wrapped network (``models.tied_plain_net``): while one of
its adapters is active, each targeted plain layer runs on W + ΔW (peft's own ``get_delta_weight``), built for its
forward and dropped after it, so at most one merged weight exists at a time.

With gradient, the layer is one autograd node (:class:`_Factored`): its backward
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
            return _Factored.apply(x, lora.lora_A[adapter].weight, lora.lora_B[adapter].weight, lora, adapter, layer)
        # An instance attribute is found before nn.Module.__getattr__ reads _parameters: the layer's own forward
        # (F.linear / F.conv2d on self.weight) uses the merged tensor; the Parameter itself is untouched.
        layer.__dict__["weight"] = _merged_weight(layer, lora, adapter)
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
    """W + ΔW of ``layer`` (the plain one, whose Parameter is the base's own) for ``adapter`` of ``lora``.

    peft's Linear A is (r, in) and B (out, r); its Conv2d A is a k×k convolution (r, in, k, k) and B a 1×1 one
    (out, r, 1, 1), so (out, r) @ (r, in·k·k) is B·A laid out as W. Scaled and summed in place in that one buffer,
    in peft's order (``W + get_delta_weight``: B·A, times s, plus W), at about half its time on a CPU
    (``benchmarks.lean``'s merged-weight line): peft allocates a tensor per operation and builds a k×k layer's B·A
    with a convolution, whose sums may round differently from the matmul's (to float32 rounding; the embedded
    UNet's fixed-seed runs came out bit-identical). Grouped convolutions, transposed (``fan_in_fan_out``) or
    non-contiguous bases and mixed dtypes keep peft's own."""
    W = layer._parameters["weight"]
    A, B = lora.lora_A[adapter].weight, lora.lora_B[adapter].weight
    if (getattr(layer, "groups", 1) != 1 or getattr(lora, "fan_in_fan_out", False) or not W.is_contiguous()
            or not A.dtype == B.dtype == W.dtype):
        return W + lora.get_delta_weight(adapter)
    delta = B.flatten(1) @ A.flatten(1)
    if lora.scaling[adapter] != 1:
        delta.mul_(lora.scaling[adapter])
    return delta.add_(W.flatten(1)).view_as(W)


class _Factored(torch.autograd.Function):
    """y = layer(x) on W + s B A (a Linear, or a k×k Conv2d with peft's A: (r, in, k, k), B: (out, r, 1, 1)),
    differentiable in x, A and B; the base W and b are frozen."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, A: Tensor, B: Tensor, lora: nn.Module, adapter: str, layer: nn.Module) -> Tensor:
        ctx.save_for_backward(x, A, B)
        ctx.lora, ctx.adapter, ctx.layer = lora, adapter, layer
        W = _merged_weight(layer, lora, adapter)
        return F.linear(x, W, layer.bias) if isinstance(layer, nn.Linear) else layer._conv_forward(x, W, layer.bias)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, A, B = ctx.saved_tensors
        grads = _linear_grads if isinstance(ctx.layer, nn.Linear) else _conv_grads
        need = ctx.needs_input_grad[:3]
        return (*grads(ctx.layer, ctx.lora, ctx.adapter, x, A, B, dy, need), None, None, None)


def _linear_grads(layer: nn.Module, lora: nn.Module, adapter: str, x: Tensor, A: Tensor, B: Tensor, dy: Tensor,
                  need: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """dL/dx, dL/dA, dL/dB of y = x (W + s B A)ᵀ + b; x (..., in), dy (..., out)."""
    s = lora.scaling[adapter]
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # (T, in), (T, out)
    dx = dy @ _merged_weight(layer, lora, adapter) if need[0] else None
    dA = ((dy2 @ B).t() @ x2) * s if need[1] else None  # (r, T) (T, in)
    dB = (dy2.t() @ (x2 @ A.t())) * s if need[2] else None  # (out, T) (T, r)
    return dx, dA, dB


def _conv_grads(layer: nn.Module, lora: nn.Module, adapter: str, x: Tensor, A: Tensor, B: Tensor, dy: Tensor,
                need: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """dL/dx, dL/dA, dL/dB of y = conv(x, W + s B∘A) + b; x (N, in, H, W), dy (N, out, H', W')."""
    s = lora.scaling[adapter]
    geometry = (layer.stride, layer.padding, layer.dilation, False, (0, 0), 1)
    conv_backward = torch.ops.aten.convolution_backward
    dx = dA = dB = None
    if need[0]:
        dx = conv_backward(dy, x, _merged_weight(layer, lora, adapter), None, *geometry, (True, False, False))[0]
    if need[1]:  # v = Bᵀ dy (1×1), then the k×k weight gradient of conv(x, A) against v
        v = F.conv2d(dy, B.transpose(0, 1))
        dA = conv_backward(v, x, A, None, *geometry, (False, True, False))[1] * s
    if need[2]:  # dL/dB[o, r] = s Σ dy[n, o, h, w] u[n, r, h, w]: the 1×1 weight gradient against u = conv(x, A)
        u = F.conv2d(x, A, None, layer.stride, layer.padding, layer.dilation)
        dB = conv_backward(dy, u, B, None, (1, 1), (0, 0), (1, 1), False, (0, 0), 1, (False, True, False))[1] * s
    return dx, dA, dB
