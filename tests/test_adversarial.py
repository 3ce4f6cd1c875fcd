"""distill_diffusion.adversarial: the hinge losses' closed forms (the heads' use is tested by TSCD and sCM)."""

import torch

from distill_diffusion.adversarial import hinge_d_loss, hinge_g_loss


def test_hinge_closed_forms():
    fake = [torch.tensor([[[[0.5, -2.0]]]]), torch.tensor([[[[3.0, 0.0]]]])]
    real = [torch.tensor([[[[0.0, 2.0]]]]), torch.tensor([[[[-1.0, 1.0]]]])]
    # head 1: relu(1+f) = (1.5, 0) -> .75, relu(1-r) = (1, 0) -> .5; head 2: (4, 1) -> 2.5, (2, 0) -> 1
    assert abs(float(hinge_d_loss(fake, real)[0]) - ((0.75 + 0.5) + (2.5 + 1.0)) / 2) < 1e-6
    # relu(1-f): head 1 (0.5, 3) -> 1.75; head 2 (0, 1) -> .5
    assert abs(float(hinge_g_loss(fake)[0]) - (1.75 + 0.5) / 2) < 1e-6
    # −f (LADD): head 1 (−0.5, 2) -> .75; head 2 (−3, 0) -> −1.5
    assert abs(float(hinge_g_loss(fake, saturating=False)[0]) - (0.75 - 1.5) / 2) < 1e-6
