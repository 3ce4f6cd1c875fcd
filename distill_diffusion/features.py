"""Feature taps: the outputs of named blocks of a network during one ordinary forward, through forward hooks.

One mechanism for every method that reads a network's inner features (DMD2's GAN head on the mid block, PCM's
discriminator heads on every block), so none re-implements the network's forward:

    with tap(net, ["down_blocks.0", "mid_block"], stop_after_last=True) as feats:
        net(xt, t, encoder_hidden_states=...)
    h = [feats["down_blocks.0"], feats["mid_block"]]

Which blocks a family offers is the family's business (``Family.feature_blocks``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn


class _AllTapped(Exception):
    """Raised by the hook of the last tapped block to skip the rest of a forward whose output is not needed."""


@contextlib.contextmanager
def tap(net: nn.Module, names: Sequence[str], stop_after_last: bool = False,
        pick: Callable[[Any], Any] | None = None) -> Iterator[dict[str, Any]]:
    """Record the outputs of ``net``'s submodules ``names`` (as ``net.get_submodule`` names them) during the forward
    run inside the block, into the yielded dict name -> tensor (the first element when a block returns a tuple, as
    diffusers' down blocks return (hidden_states, residuals)), or ``pick(output)`` when given (a transformer block
    that returns (encoder_hidden_states, hidden_states) needs the second).

    ``stop_after_last``: once every named block has run, the forward is cut short (the rest of the network never
    runs, the block's remaining statements are skipped and the forward's return value is lost). The hooks are
    removed on exit either way. Gradient flows through the recorded tensors as through any forward.
    """
    feats: dict[str, Tensor] = {}
    wanted = set(names)

    def hook(name: str) -> Any:
        def record(_module: nn.Module, _inputs: Any, out: Any) -> None:
            feats[name] = pick(out) if pick is not None else (out[0] if isinstance(out, tuple) else out)
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
