"""The real CLIP BPE tokenizer, built offline from the vocabulary that ships inside open_clip.

Random-weight tiny models still need the real tokenizer: prompt lengths, truncation at 77 tokens
and padding behave exactly as with Stable Diffusion, so batching and latency are realistic. No
hub download is needed because ``open_clip_torch`` carries ``bpe_simple_vocab_16e6.txt.gz``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

#: CLIP's vocabulary size and context length (as in openai/clip-vit-large-patch14).
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
_N_MERGES = 49152 - 256 - 2


def bpe_vocab_path() -> Path:
    """Where open_clip keeps its BPE merges file, found without importing open_clip (slow: timm, torchvision)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is not installed; it ships the CLIP BPE vocabulary")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise RuntimeError("bpe_simple_vocab_16e6.txt.gz not found inside the open_clip package")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (same as open_clip.tokenizer.bytes_to_unicode)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer_files(folder: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` in the Hugging Face CLIP format.

    The id order is the one open_clip (and OpenAI CLIP) uses: 256 byte symbols, the same with
    ``</w>``, one entry per merge, then the two special tokens, so ids match the original model.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : _N_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    vocab_file = folder / "vocab.json"
    merges_file = folder / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def build_clip_tokenizer(workdir: str | Path):
    """A ``transformers.CLIPTokenizer`` from open_clip's vocabulary; ``workdir`` holds its files."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_clip_tokenizer_files(workdir)
    return CLIPTokenizer(
        vocab=str(vocab_file), merges=str(merges_file), model_max_length=CONTEXT_LENGTH
    )
