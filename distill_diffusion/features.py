"""Feature taps: the outputs of named blocks of a network during one ordinary forward, through forward hooks.

One mechanism for every method that reads a UNet's inner features (DMD2's GAN head on the mid block, PCM's
discriminator heads on every block), so none re-implements the network's forward:

    names = unet_block_names(unet, up_blocks=False)
    with tap(unet, names, stop_after_last=True) as feats:
        unet(xt, t, encoder_hidden_states=...)
    h = [feats[n] for n in names]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, nn


class _AllTapped(Exception):
    """Raised by the hook of the last tapped block to skip the rest of a forward whose output is not needed."""


def unet_block_names(unet: nn.Module, up_blocks: bool = True) -> list[str]:
    """Names of a ``UNet2DConditionModel``'s blocks in the order its forward runs them: every down block, the mid
    block (when it has one) and, with ``up_blocks``, every up block, e.g. ["down_blocks.0", ..., "mid_block"]."""
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    names += ["mid_block"] if unet.mid_block is not None else []
    names += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))] if up_blocks else []
    return names


@contextlib.contextmanager
def tap(net: nn.Module, names: Sequence[str], stop_after_last: bool = False) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of ``net``'s submodules ``names`` (as ``net.get_submodule`` names them) during the forward
    run inside the block, into the yielded dict name -> tensor (the first element when a block returns a tuple, as
    diffusers' down blocks return (hidden_states, residuals)).

    ``stop_after_last``: once every named block has run, the forward is cut short (the rest of the network never
    runs, the block's remaining statements are skipped and the forward's return value is lost). The hooks are
    removed on exit either way. Gradient flows through the recorded tensors as through any forward.
    """
    feats: dict[str, Tensor] = {}
    wanted = set(names)

    def hook(name: str) -> Any:
        def record(_module: nn.Module, _inputs: Any, out: Any) -> None:
            feats[name] = out[0] if isinstance(out, tuple) else out
            if stop_after_last and wanted.issubset(feats):
                raise _AllTapped

        return record

    handles = [net.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        yield feats
    except _AllTapped:
        pass
    finally:
        for h in handles:
            h.remove()
