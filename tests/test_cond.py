"""Cond: the conditioning every UNet call receives."""

import torch

from distill_diffusion.method import Cond


def test_to_casts_every_tensor_and_keeps_absent_ones():
    c = Cond(torch.randn(2, 3, 4), torch.randn(2, 5), torch.randn(2, 6))
    h = c.to(torch.bfloat16)
    assert (h.prompt_embeds.dtype, h.pooled.dtype, h.time_ids.dtype) == (torch.bfloat16,) * 3
    assert torch.equal(h.prompt_embeds, c.prompt_embeds.to(torch.bfloat16))
    assert torch.equal(h.pooled, c.pooled.to(torch.bfloat16)) and torch.equal(h.time_ids, c.time_ids.to(torch.bfloat16))
    sd15 = Cond(torch.randn(2, 3, 4)).to(torch.float16)
    assert sd15.prompt_embeds.dtype == torch.float16 and sd15.pooled is None and sd15.time_ids is None
    assert c.to(torch.float32).prompt_embeds is c.prompt_embeds  # no copy when nothing changes
