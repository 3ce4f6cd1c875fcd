"""Small pieces of the training loop: the gradient finiteness check and the optimizer's kernel choice."""

import torch

from distill_diffusion import loop


class _OneProcess:
    num_processes = 1


def test_one_non_finite_element_in_any_tensor_is_found():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 5, 2)]
    for p in params:
        p.grad = torch.ones_like(p)
    params.append(torch.nn.Parameter(torch.zeros(4)))  # no gradient: not checked
    assert loop._all_reduce_grads(params, 0.5, _OneProcess()) == (True, 0.5)
    for bad in (float("nan"), float("inf"), -float("inf")):
        params[1].grad[3] = bad
        assert loop._all_reduce_grads(params, 0.5, _OneProcess())[0] is False
        params[1].grad[3] = 1.0
    assert loop._all_reduce_grads(params, float("nan"), _OneProcess())[0] is False


def test_fused_adamw_where_it_applies_and_it_follows_the_loop():
    """Fused for unsharded floating-point tensors on one device; torch's default otherwise. After 30 steps the fused
    kernel's parameters are the per-tensor loop's to float32 rounding (not bit for bit)."""
    params = [torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n))) for n in (7, 33, 128)]
    assert loop.fused_adamw(params, sharded=False) is True
    assert loop.fused_adamw(params, sharded=True) is None
    assert loop.fused_adamw([], sharded=False) is None
    a = [p.detach().clone().requires_grad_() for p in params]
    b = [p.detach().clone().requires_grad_() for p in params]
    opt_a = torch.optim.AdamW(a, lr=5e-3, weight_decay=1e-2)
    opt_b = torch.optim.AdamW(b, lr=5e-3, weight_decay=1e-2, fused=loop.fused_adamw(b, sharded=False))
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        for x, y in zip(a, b):
            x.grad = torch.randn(x.shape, generator=g)
            y.grad = x.grad.clone()
        opt_a.step()
        opt_b.step()
    for x, y, p in zip(a, b, params):
        assert not torch.equal(x, p)  # both moved
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
