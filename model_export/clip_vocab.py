"""The CLIP BPE tokenizer as a `tokenizers` JSON file, built from the vocabulary open_clip ships."""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from model_export.errors import ExportError

BPE_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGE_COUNT = 49152 - 256 - 2  # lines 1..48894 of the vocabulary file, as the reference reads them
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
# CLIP's pre-tokenization pattern (reference SimpleTokenizer and HF's CLIPTokenizerFast).
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bpe_vocab_path() -> Path:
    """The vocabulary inside the installed open_clip package, found without importing it (that needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("open_clip_torch is not installed: pip install --no-deps open_clip_torch==3.3.0")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_VOCAB_FILE
    if not path.is_file():
        raise ExportError(f"{path} is missing from the open_clip_torch installation")
    return path


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, in the reference's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


def build_tokenizer_json() -> str:
    """The CLIP tokenizer (49,408 tokens) as a `tokenizers` JSON document, `added_tokens` empty."""
    lines = gzip.decompress(bpe_vocab_path().read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGE_COUNT + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [char + "</w>" for char in byte_chars] + ["".join(merge) for merge in merges]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=END_OF_TEXT,
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing(
        sep=(END_OF_TEXT, vocab[END_OF_TEXT]),
        cls=(START_OF_TEXT, vocab[START_OF_TEXT]),
        add_prefix_space=False,
        trim_offsets=False,
    )
    return normalize_tokenizer_json(tokenizer.to_str())


def normalize_tokenizer_json(text: str) -> str:
    """Make any CLIP `tokenizer.json` behave as the runtime expects.

    - `added_tokens` emptied: a literal "<|endoftext|>" typed in a query is ordinary text, as in the reference.
    - no normalizer: the runtime applies the reference's text cleaning itself (ftfy, HTML unescape, whitespace,
      lowercase); HF's NFC step would compose characters the reference leaves decomposed.
    - no truncation or padding stored in the file: the runtime truncates to the context length itself.
    """
    document = json.loads(text)
    vocab = document["model"]["vocab"]
    for token in (START_OF_TEXT, END_OF_TEXT):
        if token not in vocab:
            raise ExportError(f"tokenizer.json has no {token} token")
    document["added_tokens"] = []
    document["normalizer"] = None
    document["truncation"] = None
    document["padding"] = None
    if document["model"].get("type") == "BPE":
        document["model"]["ignore_merges"] = False
    return json.dumps(document, ensure_ascii=False)
