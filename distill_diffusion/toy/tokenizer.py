"""A real CLIP tokenizer without a hub: built from the BPE vocabulary that ships inside open_clip_torch."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map (so BPE never sees whitespace/control bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def bpe_path() -> Path:
    """open_clip's copy of OpenAI's BPE file (the first line is a header, then one merge per line)."""
    import open_clip

    p = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found; reinstall open_clip_torch")
    return p


@lru_cache(maxsize=1)
def vocab_files() -> tuple[str, str]:
    """vocab.json and merges.txt derived from the bundled BPE file (cached in the temp dir)."""
    src = bpe_path()
    key = hashlib.sha1(src.read_bytes()).hexdigest()[:12]
    d = Path(os.environ.get("DISTILL_CACHE", tempfile.gettempdir())) / f"clip-bpe-{key}"
    vocab_f, merges_f = d / "vocab.json", d / "merges.txt"
    if not (vocab_f.is_file() and merges_f.is_file()):
        d.mkdir(parents=True, exist_ok=True)
        lines = gzip.open(src).read().decode("utf-8").split("\n")
        merges = lines[1 : 49152 - 256 - 2 + 1]
        byte_tokens = list(_bytes_to_unicode().values())
        vocab = byte_tokens + [t + "</w>" for t in byte_tokens]
        vocab += ["".join(m.split()) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        tmp_v, tmp_m = d / f".v{os.getpid()}", d / f".m{os.getpid()}"
        tmp_v.write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
        tmp_m.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        os.replace(tmp_v, vocab_f)
        os.replace(tmp_m, merges_f)
    return str(vocab_f), str(merges_f)


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A transformers ``CLIPTokenizer`` equal to OpenAI CLIP's (49408 tokens), padded with <|endoftext|> as Stable
    Diffusion's is (open_clip pads with 0; the ids up to <|endoftext|> are identical)."""
    from transformers import CLIPTokenizer

    vocab_f, merges_f = vocab_files()
    return CLIPTokenizer(vocab_f, merges_f, pad_token="<|endoftext|>", model_max_length=model_max_length)
