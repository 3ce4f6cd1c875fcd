"""Feature taps: the outputs of named blocks during the network's own forward."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from distill_diffusion.families import StableDiffusion
from distill_diffusion.features import tap


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 3, 8, generator=g)


def test_block_names_follow_the_forward_order(unet):
    names = StableDiffusion.feature_blocks(None, unet)
    assert names == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert StableDiffusion.feature_blocks(None, unet, all_levels=False) == names[:3]
    x, t, ehs = inputs()
    with torch.no_grad(), tap(unet, names) as feats:
        unet(x, t, encoder_hidden_states=ehs)
    assert list(feats) == names  # recorded in the order the forward ran them
    assert [f.shape[1] for f in feats.values()] == [8, 16, 16, 16, 8]


def test_the_last_up_block_output_is_what_the_head_of_the_unet_reads(unet):
    x, t, ehs = inputs()
    with torch.no_grad(), tap(unet, ["up_blocks.1"]) as feats:
        out = unet(x, t, encoder_hidden_states=ehs).sample
    h = feats["up_blocks.1"]
    assert torch.equal(unet.conv_out(unet.conv_act(unet.conv_norm_out(h))), out)


def test_stop_after_last_skips_the_rest_and_records_the_same_tensor(unet):
    x, t, ehs = inputs()
    names = ["down_blocks.0", "mid_block"]
    with torch.no_grad(), tap(unet, names) as full:
        unet(x, t, encoder_hidden_states=ehs)
    ran = []
    handle = unet.up_blocks[0].register_forward_hook(lambda *_: ran.append(1))
    try:
        after = []
        with torch.no_grad(), tap(unet, names, stop_after_last=True) as short:
            unet(x, t, encoder_hidden_states=ehs)
            after.append(1)
    finally:
        handle.remove()
    assert ran == [] and after == []  # the up blocks and the rest of the with-block never ran
    assert list(short) == names and all(torch.equal(short[n], full[n]) for n in names)
    assert not unet.mid_block._forward_hooks  # removed on exit


def test_gradient_reaches_the_input_and_hooks_go_on_error(unet):
    x, t, ehs = inputs()
    x = x.requires_grad_()
    with tap(unet, ["down_blocks.1"], stop_after_last=True) as feats:
        unet(x, t, encoder_hidden_states=ehs)
    feats["down_blocks.1"].square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(RuntimeError), tap(unet, ["down_blocks.0"]):
        unet(x, t, encoder_hidden_states=torch.randn(2, 3, 5))  # wrong cross-attention width
    assert not unet.down_blocks[0]._forward_hooks
