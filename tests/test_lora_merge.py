"""LoRA forwards on merged weights (distill_diffusion.lora_merge): the same function and gradients as peft's."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill_diffusion.config import parse_config
from distill_diffusion.errors import UserError
from distill_diffusion.lora_merge import unsupported_reason
from distill_diffusion.models import Models


def _models(path: str, lora_merge: str, **kw) -> Models:
    torch.manual_seed(0)  # peft draws A at random: two builds compared must draw the same
    m = Models(path, "lora", roles=("student", "critic"), lora_rank=2, lora_alpha=4, lora_merge=lora_merge, **kw)
    with torch.no_grad():  # adapters away from B = 0, so they change the output
        for i, r in enumerate(("student", "critic")):
            for p in m.parameters(r):
                p.add_(0.05 * (i + 1))
    return m


def _student_grads(m: Models, xt, t, cond) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with m.trainable("student"):
        out = m.net_out("student", xt, t, cond)
        out.square().mean().backward()
    grads = [p.grad.clone() for p in m.parameters("student")]
    for p in m.parameters("student"):
        p.grad = None
    return out.detach(), grads


def test_gradients_match_peft(tiny_teachers):
    """With gradient, merged forwards give peft's output and peft's LoRA gradients (to float32 rounding)."""
    xt, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    ref = _models(tiny_teachers["sd"], "off")
    ours = _models(tiny_teachers["sd"], "always")
    cond = ref.encode_prompts(["a cat", "a dog"])
    out_ref, g_ref = _student_grads(ref, xt[:, :, : ref.latent_shape[1], : ref.latent_shape[2]], t, cond)
    out, g = _student_grads(ours, xt[:, :, : ref.latent_shape[1], : ref.latent_shape[2]], t, cond)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    assert len(g) == len(g_ref) and any(x.abs().sum() > 0 for x in g)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_no_grad_mode_merges_only_without_gradient(tiny_teachers):
    """lora_merge=no_grad: a forward with gradient is peft's, bit for bit; one without gradient is merged."""
    off, ng = _models(tiny_teachers["sd"], "off"), _models(tiny_teachers["sd"], "no_grad")
    xt, t = torch.randn(2, *off.latent_shape, generator=torch.Generator().manual_seed(1)), torch.tensor([50, 700])
    cond = off.encode_prompts(["a cat", "a dog"])
    assert torch.equal(_student_grads(off, xt, t, cond)[0], _student_grads(ng, xt, t, cond)[0])
    with torch.no_grad():
        a, b = off.net_out("critic", xt, t, cond), ng.net_out("critic", xt, t, cond)
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_merged_weights_never_outlive_a_forward(tiny_teachers):
    """A forward cut short (features' early stop) leaves no merged weight behind, and the base tensors are
    untouched: the teacher's forward is the same before and after."""
    m = _models(tiny_teachers["sd"], "always")
    xt, t = torch.randn(2, *m.latent_shape), torch.tensor([10, 900])
    cond = m.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        before = m.net_out("teacher", xt, t, cond)
        names = m.feature_blocks(all_levels=False)[:1]
        feats = m.features("critic", xt, t, cond, names, stop=True)
        assert len(feats) == 1
        assert not [layer for layer in m._merged.layers if "weight" in layer.__dict__]
        assert torch.equal(m.net_out("teacher", xt, t, cond), before)


def test_auto_and_fallbacks(tiny_teachers, capsys):
    """auto is always on a CPU; a half-precision base runs peft's wrappers (and says so when merging was asked)."""
    assert Models(tiny_teachers["sd"], "lora", lora_rank=2).lora_merge == "always"
    m = Models(tiny_teachers["sd"], "lora", lora_rank=2, lora_merge="always", weight_dtype=torch.bfloat16)
    assert m._merged is None and "half-precision base" in capsys.readouterr().err
    assert Models(tiny_teachers["sd"], "lora", lora_rank=2, lora_merge="off")._merged is None


@pytest.mark.parametrize("extra, reason", [({}, None), ({"lora_dropout": 0.1}, "lora_dropout"),
                                           ({"use_dora": True}, "DoRA or an adapter bias")])
def test_unsupported_layers(extra, reason):
    from peft import LoraConfig, inject_adapter_in_model

    net = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["0"], **extra),
                                  nn.Sequential(nn.Linear(4, 4)), adapter_name="a")
    assert unsupported_reason(net[0], "a") == reason


def test_config_values():
    from methods import METHODS

    assert parse_config(["--method", "lcm", "lora_merge=off"], METHODS)[0].lora_merge == "off"
    assert parse_config(["--method", "lcm"], METHODS)[0].lora_merge == "auto"
    with pytest.raises(UserError, match="lora_merge='sometimes'"):
        parse_config(["--method", "lcm", "lora_merge=sometimes"], METHODS)


def test_bf16_on_a_cpu_keeps_a_float32_base(tiny_teachers):
    """mixed_precision=bf16 with a LoRA student on a CPU holds the frozen base in float32 (so adapters merge); and
    under bf16 autocast the merged forward is no further from the float32 output than peft's on a bf16 base."""
    from types import SimpleNamespace

    from distill_diffusion.models import frozen_dtype

    def cfg(**kw):
        return SimpleNamespace(**{"mixed_precision": "bf16", "student": "lora", "lora_merge": "auto",
                                  "compile": False, **kw})

    cpu = torch.device("cpu")
    assert frozen_dtype(cfg(), cpu) == torch.float32
    assert frozen_dtype(cfg(lora_merge="off"), cpu) == frozen_dtype(cfg(compile=True), cpu) == torch.bfloat16
    assert frozen_dtype(cfg(student="full"), cpu) == frozen_dtype(cfg(), torch.device("meta")) == torch.bfloat16
    assert frozen_dtype(cfg(mixed_precision="no"), cpu) == torch.float32

    exact, merged = _models(tiny_teachers["sd"], "off"), _models(tiny_teachers["sd"], "always")
    peft_bf16 = _models(tiny_teachers["sd"], "off", weight_dtype=torch.bfloat16)
    xt = torch.randn(4, *exact.latent_shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([5, 300, 600, 990])
    cond = exact.encode_prompts(["a cat", "a dog", "a cow", "a hen"])
    with torch.no_grad():
        ref = exact.net_out("student", xt, t, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            err_merged = (merged.net_out("student", xt, t, cond) - ref).norm()
            err_peft = (peft_bf16.net_out("student", xt, t, cond) - ref).norm()
    assert 0 < err_merged <= 1.2 * err_peft, (err_merged, err_peft)


@pytest.mark.parametrize("layer", [
    nn.Linear(6, 5), nn.Linear(6, 5, bias=False), nn.Conv2d(3, 4, 3, padding=1),
    nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=2, dilation=2)], ids=str)
@pytest.mark.parametrize("train_factors", [True, False])
def test_factored_backward_equals_autograd_through_the_merged_weight(layer, train_factors):
    """The factored layer's gradients for x, A and B are autograd's through W + s·B·A, which forms dL/dW; with the
    factors frozen (another role's adapter inside a student's loss) only x gets one."""
    from peft import LoraConfig, inject_adapter_in_model

    from distill_diffusion.lora_merge import MergedLora, _Factored

    torch.manual_seed(0)
    wrapped = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=3, target_modules=["0"]), nn.Sequential(layer),
                                      adapter_name="a").requires_grad_(False)
    lora = wrapped[0]
    A, B = lora.lora_A["a"].weight, lora.lora_B["a"].weight
    with torch.no_grad():
        B.normal_()  # away from B = 0
    A.requires_grad_(train_factors), B.requires_grad_(train_factors)
    plain = nn.Sequential(type(layer)(1, 1) if isinstance(layer, nn.Linear) else nn.Conv2d(1, 1, 1))
    plain[0] = layer  # the base itself: the same tensors, as tied_plain_net gives
    merged = MergedLora(wrapped, plain)
    x = torch.randn((2, 7, 6) if isinstance(layer, nn.Linear) else (2, 3, 9, 9), requires_grad=True)
    dy = torch.randn_like(layer(x))

    with merged.active("a"):
        y = plain(x)
        with torch.no_grad():
            y_merged = plain(x)
    assert y.grad_fn.name() == _Factored.__name__ + "Backward"
    got = torch.autograd.grad(y, [x, A, B] if train_factors else [x], dy)
    w = layer.weight + lora.get_delta_weight("a")  # peft's merge, differentiable in A and B
    ref_y = F.linear(x, w, layer.bias) if isinstance(layer, nn.Linear) else layer._conv_forward(x, w, layer.bias)
    ref = torch.autograd.grad(ref_y, [x, A, B] if train_factors else [x], dy)
    torch.testing.assert_close(y, y_merged, rtol=0, atol=0)  # the forward is the merged one, bit for bit
    scale = float(ref_y.detach().abs().max())
    torch.testing.assert_close(y, ref_y, rtol=1e-6, atol=1e-6 * scale)  # peft's merge, to float32 rounding
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_autocast_runs_the_merged_weight_through_autograd(tiny_teachers):
    """Under CPU bf16 autocast a forward with gradient runs the merged weight through autograd (the factored
    backward does not repeat autocast's casts), and its gradients stay close to float32 peft's."""
    ref, ours = _models(tiny_teachers["sd"], "off"), _models(tiny_teachers["sd"], "always")
    xt, t = torch.randn(2, *ref.latent_shape, generator=torch.Generator().manual_seed(3)), torch.tensor([20, 800])
    cond = ref.encode_prompts(["a cat", "a dog"])
    _, g_ref = _student_grads(ref, xt, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, g = _student_grads(ours, xt, t, cond)
    num = sum((a.float() - b).norm() ** 2 for a, b in zip(g, g_ref)) ** 0.5
    den = sum(b.norm() ** 2 for b in g_ref) ** 0.5
    assert 0 < num / den < 0.1, float(num / den)


def test_a_forward_with_gradient_keeps_no_merged_weight(tiny_teachers):
    """lora_merge=always saves no more for the backward than peft does (no merged copy of a weight)."""
    from benchmarks.lora_backward import forward_backward

    off, always = _models(tiny_teachers["sd"], "off"), _models(tiny_teachers["sd"], "always")
    xt, t = torch.randn(2, *off.latent_shape), torch.tensor([10, 900])
    cond = off.encode_prompts(["a cat", "a dog"])
    assert 0 < forward_backward(always, xt, t, cond) <= forward_backward(off, xt, t, cond)


@pytest.mark.parametrize("layer", [nn.Linear(6, 5), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)], ids=str)
@pytest.mark.parametrize("alpha", [2, 3])
def test_merged_weight_is_pefts_and_leaves_the_base_alone(layer, alpha):
    """The in-place merge is peft's W + get_delta_weight to float32 rounding (bit for bit at s = 1 on a Linear or a
    1×1 convolution, where both are one matmul), with s = alpha / r applied, and W itself never changes."""
    from peft import LoraConfig, inject_adapter_in_model

    from distill_diffusion.lora_merge import _merged_weight

    torch.manual_seed(0)
    lora = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=alpha, target_modules=["0"]), nn.Sequential(layer),
                                   adapter_name="a").requires_grad_(False)[0]
    with torch.no_grad():
        lora.lora_B["a"].weight.normal_()
    before = layer.weight.clone()
    with torch.no_grad():
        got, ref = _merged_weight(layer, lora, "a"), layer.weight + lora.get_delta_weight("a")
    assert torch.equal(layer.weight, before) and got.shape == ref.shape and not torch.equal(got, before)
    if alpha == 2 and layer.weight.shape[2:] in ((), (1, 1)):
        assert torch.equal(got, ref)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
