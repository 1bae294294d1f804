"""The runtime tokenizer against the reference (open_clip's SimpleTokenizer, the OpenAI CLIP code)."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from types import ModuleType

import pytest

from clipsearch.tokenizer import CONTEXT_LENGTH, ClipTokenizer, clean_text

pytestmark = pytest.mark.unit

TRICKY = [
    "a photo of a dog",
    "A Photo Of A DOG",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\nand\x0bvertical\x0cfeeds",
    "non\u00a0breaking\u2003em\u3000ideographic spaces",
    "zero\u200bwidth\u200dspace",
    "Tom &amp; Jerry &lt;3 &#39;cats&#39; &quot;mice&quot;",
    "double escaped &amp;amp; and &amp;lt;b&amp;gt;",
    "&#x1F600; &#128512; &copy; &nbsp;x &eacute;",
    "\u201ccurly quotes\u201d and \u2018single\u2019 and it\u2019s",
    "it's we're they've I'm you'll he'd don't",
    "IT'S WE'RE THEY'VE I'M YOU'LL HE'D",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe",
    "cafe\u0301 decomposed accent",
    "cafe&#769; decomposed by an entity",
    "cafe&amp;#769; decomposed by a double-escaped entity",
    "lone surrogates \ud800 and \udc00",
    "mojibake: caf\u00c3\u00a9 and \u00e2\u20ac\u0153quoted\u00e2\u20ac\ufffd",
    "\u4e00\u53ea\u732b\u5728\u684c\u5b50\u4e0a",
    "\u732b\u306e\u5199\u771f\u3068\u30ab\u30bf\u30ab\u30ca",
    "\ud55c\uad6d\uc5b4 \ubb38\uc7a5",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0645\u0631\u062d\u0628\u0627",
    "\u0939\u093f\u0928\u094d\u0926\u0940 \u092d\u093e\u0937\u093e",
    "\u0395\u039b\u039b\u0397\u039d\u0399\u039a\u0391 \u039f\u0394\u039f\u03a3",
    "\u0130stanbul \u0131\u015f\u0131k",
    "emoji \U0001f436\U0001f431 dog\U0001f3fd\U0001f44d\U0001f3fb",
    "family \U0001f468\u200d\U0001f469\u200d\U0001f467 flag \U0001f1eb\U0001f1f7",
    "<|endoftext|>",
    "a cat <|endoftext|> a dog <|startoftext|>",
    "<|ENDOFTEXT|> shouting",
    "numbers 1234567890 3.14159 1,000,000 2nd 21st",
    "!!!??? ... --- *** ### @@@ $$$ %%% ^^^",
    "email@example.com https://example.com/path?q=1&r=2#frag",
    "snake_case camelCase kebab-case PascalCase",
    "\u2460\u2461\u2462 \u24b6\u24b7\u24b8 \u00bd \u00b2 \u2153",
    "\uff21\uff22\uff23 fullwidth \uff11\uff12\uff13",
    "\ufb01 ligature \ufb02ow",
    "",
    "   ",
    "\u200b",
    "a",
    "'",
    "'s",
    "''s'",
    "x" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "control\x00chars\x07here\x1b[31m",
    "\x1c\x1d\x1e\x1fseparators",
    "\u2028line\u2029paragraph\u0085next",
]
ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    " \t\n\r\x0b\x0c\u00a0\u2003\u3000\u200b\u2028",
    "\u00e0\u00e9\u00ee\u00f5\u00fc\u00e7\u00f1\u00c5\u00d8\u00df\u0301\u0308\u0130\u0131",
    "\u4e00\u4e8c\u4e09\u732b\u72ac\u65e5\u672c\u8a9e\u3042\u30a2\ud55c\uae00",
    "\u0627\u0628\u062a\u05d0\u05d1\u0905\u0906\u0e01\u0e02\u0391\u03b2\u03a3\u0416\u0436",
    "\U0001f600\U0001f436\U0001f3fd\u200d\u2764\ufe0f\U0001f1fa\U0001f1f8\u2600\u2603",
    "\u201c\u201d\u2018\u2019\u2013\u2014\u2026\u00ab\u00bb\u2022\u00a9\u00ae\u2122",
]
FRAGMENTS = ["&amp;", "&lt;", "&gt;", "&#39;", "&quot;", "&#x27;", "&eacute;", "&amp;amp;", "<|endoftext|>",
             "'s", "'LL", "\u00c3\u00a9", "\u00e2\u20ac\u2122", "https://", " photo of ", "<b>", "\r\n"]


def fuzzed_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    strings = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, rng.choice([6, 40]))):
            if rng.random() < 0.15:
                parts.append(rng.choice(FRAGMENTS))
            else:
                alphabet = rng.choice(ALPHABETS)
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))))
        strings.append("".join(parts))
    return strings


def long_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["photo", "of", "a", "dog", "running", "on", "the", "beach", "at", "sunset", "\u732b", "caf\u00e9",
             "!", "3", "it's", "\U0001f436", "&amp;"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(60, 400))) for _ in range(count)]


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    """open_clip's tokenizer module loaded by file path: the package __init__ would import torchvision."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch==3.3.0)")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("reference_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> ClipTokenizer:
    from model_export.clip_vocab import build_tokenizer_json

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    path.write_text(build_tokenizer_json(), encoding="utf-8")
    return ClipTokenizer.from_file(path)


def reference_ids(reference: ModuleType, text: str) -> list[int]:
    row = reference.tokenize([text], context_length=CONTEXT_LENGTH)[0].tolist()
    return row[: row.index(reference._tokenizer.eot_token_id) + 1]


def test_matches_the_reference_on_tricky_fuzzed_and_long_strings(reference, tokenizer) -> None:
    strings = TRICKY + fuzzed_strings(1200, seed=0) + long_strings(60, seed=1)
    mismatches = []
    for text in strings:
        expected = reference_ids(reference, text)
        got = tokenizer.encode(text).ids.tolist()
        if got != expected:
            mismatches.append((text, expected, got))
    assert len(strings) >= 1000
    assert mismatches == []


def test_special_token_ids_are_the_reference_ones(reference, tokenizer) -> None:
    ids = tokenizer.encode("a dog").ids
    assert ids[0] == reference._tokenizer.sot_token_id == 49406
    assert ids[-1] == reference._tokenizer.eot_token_id == tokenizer.end_of_text_id == 49407


def test_long_text_is_truncated_keeping_end_of_text(tokenizer) -> None:
    tokenized = tokenizer.encode("a dog " * 200)
    assert tokenized.truncated
    assert len(tokenized.ids) == CONTEXT_LENGTH
    assert tokenized.ids[-1] == tokenizer.end_of_text_id
    assert tokenized.ids.dtype.name == "int64"


def test_text_that_fits_is_not_padded_or_truncated(tokenizer) -> None:
    tokenized = tokenizer.encode("a photo of a dog")
    assert not tokenized.truncated
    assert len(tokenized.ids) == 7


def test_exactly_full_context_is_not_truncated(tokenizer) -> None:
    tokenized = tokenizer.encode("dog " * (CONTEXT_LENGTH - 2))
    assert len(tokenized.ids) == CONTEXT_LENGTH
    assert not tokenized.truncated
    assert tokenizer.encode("dog " * (CONTEXT_LENGTH - 1)).truncated


def test_literal_end_of_text_in_a_query_is_ordinary_text(tokenizer) -> None:
    ids = tokenizer.encode("a <|endoftext|> b").ids.tolist()
    assert ids.count(tokenizer.end_of_text_id) == 1
    assert ids[-1] == tokenizer.end_of_text_id


def test_cleaning_unescapes_html_twice_and_collapses_whitespace() -> None:
    assert clean_text("  Tom &amp;amp;\t\nJerry  ") == "tom & jerry"


def test_built_vocabulary_has_clip_size_and_no_added_tokens() -> None:
    from model_export.clip_vocab import build_tokenizer_json

    document = json.loads(build_tokenizer_json())
    assert len(document["model"]["vocab"]) == 49408
    assert document["model"]["vocab"]["<|startoftext|>"] == 49406
    assert document["added_tokens"] == [] and document["normalizer"] is None


def test_a_normalized_hugging_face_tokenizer_matches_the_reference(reference, tmp_path: Path) -> None:
    """The path a real checkpoint takes: HF's CLIPTokenizerFast file, then normalize_tokenizer_json."""
    from transformers import CLIPTokenizerFast

    from model_export.clip_vocab import build_tokenizer_json, normalize_tokenizer_json

    model = json.loads(build_tokenizer_json())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    hugging_face = CLIPTokenizerFast(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"))
    raw = hugging_face.backend_tokenizer.to_str()
    assert json.loads(raw)["added_tokens"]
    path = tmp_path / "tokenizer.json"
    path.write_text(normalize_tokenizer_json(raw), encoding="utf-8")
    tokenizer = ClipTokenizer.from_file(path)
    strings = TRICKY + fuzzed_strings(300, seed=3)
    mismatches = [text for text in strings if tokenizer.encode(text).ids.tolist() != reference_ids(reference, text)]
    assert mismatches == []


def test_printable_ascii_skips_ftfy_with_the_same_result() -> None:
    import html
    import string

    import ftfy

    rng = random.Random(3)
    alphabet = string.printable.replace("&", "")  # with whitespace controls: they take ftfy's path
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(3000)]
    texts += ["It's a \"dog\" -- 100% <b>", "&amp; &lt;", "tab\there", "caf\u00e9 &amp;amp; \u732b"]
    for text in texts:
        expected = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()
        assert clean_text(text) == expected, text
