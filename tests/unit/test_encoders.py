"""ONNX text and image encoders on the tiny exported model: true length, batching, bad input, lazy loading."""

from __future__ import annotations

import io
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.encoders import (
    LOWEST_NICE,
    ImageEmbedding,
    OnnxImageEncoder,
    OnnxTextEncoder,
    create_session,
    normalized,
)
from clipsearch.errors import ImageTooLarge, InvalidImage, ModelFilesInvalid
from clipsearch.images import ImagePreprocessor
from clipsearch.model_files import ModelFiles
from clipsearch.ports import ImageInput

pytestmark = pytest.mark.integration

QUERIES = ["a photo of a dog", "cat", "", "two red cars parked next to the eiffel tower at night", "dog " * 120,
           "\u732b\u306e\u5199\u771f", "it's a <|endoftext|> literal", "\U0001f436\U0001f431"]


@pytest.fixture(scope="module")
def model_files(tiny_model_dir: Path) -> ModelFiles:
    return ModelFiles.open(tiny_model_dir)


@pytest.fixture(scope="module")
def text_encoder(model_files: ModelFiles) -> OnnxTextEncoder:
    return OnnxTextEncoder.from_model_files(model_files, threads=1)


@pytest.fixture(scope="module")
def image_encoder(model_files: ModelFiles) -> OnnxImageEncoder:
    return OnnxImageEncoder.from_model_files(model_files, threads=1, batch_size=4)


def cosines(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return np.sum(normalized(left) * normalized(right), axis=-1)


def test_true_length_equals_padding_to_the_full_context(text_encoder, model_files) -> None:
    session = create_session(model_files.text_graph, threads=1)
    for query in QUERIES:
        embedding = text_encoder.embed_text(query)
        padded = np.zeros((1, model_files.context_length), dtype=np.int64)
        ids = text_encoder.tokenizer.encode(query).ids
        padded[0, : len(ids)] = ids
        reference = session.run(["text_embeds"], {"input_ids": padded})[0][0]
        assert embedding.token_count == len(ids) < model_files.context_length or embedding.truncated
        assert cosines(embedding.vector, reference) >= 0.99999
        assert np.abs(embedding.vector - normalized(reference)).max() < 1e-5


def test_spin_waiting_is_off_unless_asked_and_changes_no_embedding(model_files) -> None:
    quiet = create_session(model_files.text_graph, threads=2)
    spinning = create_session(model_files.text_graph, threads=2, spinning=True)
    setting = "session.intra_op.allow_spinning"
    assert quiet.get_session_options().get_session_config_entry(setting) == "0"
    assert spinning.get_session_options().get_session_config_entry(setting) == "1"
    ids = {"input_ids": np.array([[49406, 320, 1929, 49407]], dtype=np.int64)}
    assert np.allclose(quiet.run(["text_embeds"], ids)[0], spinning.run(["text_embeds"], ids)[0], rtol=0, atol=1e-6)


def test_text_embeddings_are_normalized_and_report_truncation(text_encoder, model_files) -> None:
    short, long = text_encoder.embed_text("a dog"), text_encoder.embed_text("dog " * 120)
    for embedding in (short, long):
        assert embedding.vector.dtype == np.float32
        assert embedding.vector.shape == (model_files.embedding_dim,)
        assert abs(float(np.linalg.norm(embedding.vector)) - 1) < 1e-5
    assert (short.token_count, short.truncated) == (4, False)
    assert (long.token_count, long.truncated) == (model_files.context_length, True)


def test_embed_texts_equals_one_at_a_time_in_input_order(text_encoder) -> None:
    text_encoder.batch_size = 3
    batch = text_encoder.embed_texts(QUERIES)
    single = np.stack([text_encoder.embed_text(query).vector for query in QUERIES])
    assert batch.shape == single.shape
    assert cosines(batch, single).min() >= 0.99999


def test_injected_session_gives_the_same_embedding(text_encoder, model_files) -> None:
    injected = OnnxTextEncoder(model_files.tokenizer(), create_session(model_files.text_graph, threads=1))
    assert cosines(injected.embed_text("a cat").vector, text_encoder.embed_text("a cat").vector) >= 0.99999


def test_a_tokenizer_loaded_beforehand_is_used_and_the_graph_opened_now(text_encoder, model_files) -> None:
    tokenizer = model_files.tokenizer()
    encoder = OnnxTextEncoder.from_model_files(model_files, threads=1, open_now=True, tokenizer=tokenizer)
    assert encoder.tokenizer is tokenizer
    assert cosines(encoder.embed_text("a cat").vector, text_encoder.embed_text("a cat").vector) >= 0.99999


def test_text_search_never_loads_the_vision_graph(tiny_model_dir: Path, tmp_path: Path) -> None:
    text_only = tmp_path / "model"
    shutil.copytree(tiny_model_dir, text_only)
    (text_only / "vision" / "model.onnx").unlink()
    encoder = OnnxTextEncoder.from_model_files(ModelFiles.open(text_only), threads=1)
    assert encoder.embed_text("a photo of a dog").vector.shape == (ModelFiles.open(text_only).embedding_dim,)
    with pytest.raises(ModelFilesInvalid, match="vision/model.onnx"):
        OnnxImageEncoder.from_model_files(ModelFiles.open(text_only)).embed_image(jpeg(64, 48, seed=0), "x.jpg")


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_batch_equals_single_and_keeps_order(image_encoder, seed_eval_photos: list[Path]) -> None:
    items = [ImageInput(path.name, path.read_bytes()) for path in seed_eval_photos[:11]]
    items.append(ImageInput("generated.jpg", jpeg(500, 300, seed=0)))
    batch = image_encoder.embed_images(items)
    assert len(batch) == len(items)
    for item, embedding in zip(items, batch, strict=True):
        single = image_encoder.embed_image(item.data, item.name)
        assert isinstance(embedding, ImageEmbedding)
        assert (embedding.width, embedding.height) == (single.width, single.height)
        assert cosines(embedding.vector, single.vector) >= 0.99999
        assert abs(float(np.linalg.norm(embedding.vector)) - 1) < 1e-5
    assert (batch[-1].width, batch[-1].height) == (500, 300)


def test_decoding_in_workers_or_inline_gives_the_same_embeddings(model_files, seed_eval_photos) -> None:
    items = [ImageInput(path.name, path) for path in seed_eval_photos[:9]]
    inline = OnnxImageEncoder.from_model_files(model_files, threads=1, batch_size=4, decode_workers=0)
    pooled = OnnxImageEncoder.from_model_files(model_files, threads=1, batch_size=4, decode_workers=2)
    for left, right in zip(inline.embed_images(items), pooled.embed_images(items), strict=True):
        assert np.array_equal(left.vector, right.vector)


class PriorityRecordingPreprocessor(ImagePreprocessor):
    """Notes the nice value of each thread that prepares an image."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nice_values: set[int] = set()

    def prepare(self, source, name, thumbnail_side=None):
        self.nice_values.add(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return super().prepare(source, name, thumbnail_side)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_decode_workers_run_at_the_lowest_priority_only_when_asked(model_files, seed_eval_photos) -> None:
    items = [ImageInput(path.name, path) for path in seed_eval_photos[:4]]
    session = create_session(model_files.vision_graph, threads=1)
    caller_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    for low, expected in ((True, {LOWEST_NICE}), (False, {caller_nice})):
        preprocessor = PriorityRecordingPreprocessor(model_files.preprocess())
        encoder = OnnxImageEncoder(preprocessor, session, batch_size=2, decode_workers=2, decode_at_low_priority=low)
        assert all(isinstance(result, ImageEmbedding) for result in encoder.embed_images(items))
        assert preprocessor.nice_values == expected
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == caller_nice


def test_bad_images_give_one_named_error_each_while_the_rest_is_embedded(model_files, tmp_path: Path) -> None:
    encoder = OnnxImageEncoder.from_model_files(model_files, threads=1, batch_size=2, max_pixels=1_000_000)
    good = jpeg(400, 300, seed=1)
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    items = [
        ImageInput("good-1.jpg", good),
        ImageInput("empty.jpg", b""),
        ImageInput("truncated.jpg", good[: len(good) // 3]),
        ImageInput("good-2.jpg", jpeg(300, 400, seed=2)),
        ImageInput("notes.jpg", not_an_image),
        ImageInput("huge.jpg", jpeg(1200, 1000, seed=3)),
        ImageInput("good-3.jpg", good),
    ]
    results = encoder.embed_images(items)
    errors = {
        item.name: result for item, result in zip(items, results, strict=True) if isinstance(result, InvalidImage)
    }
    assert sorted(errors) == ["empty.jpg", "huge.jpg", "notes.jpg", "truncated.jpg"]
    assert all(error.name == name and error.reason for name, error in errors.items())
    assert isinstance(errors["huge.jpg"], ImageTooLarge)
    embedded = [result for result in results if isinstance(result, ImageEmbedding)]
    assert len(embedded) == 3
    assert np.array_equal(results[0].vector, results[-1].vector)
    with pytest.raises(InvalidImage, match="empty.jpg"):
        encoder.embed_image(b"", "empty.jpg")


def test_draft_decoding_of_large_jpegs_stays_close_to_full_decoding(model_files, seed_eval_photos) -> None:
    preprocess = model_files.preprocess()
    full_decoding = ImagePreprocessor(preprocess, draft_factor=None)
    full = OnnxImageEncoder(full_decoding, create_session(model_files.vision_graph, threads=1))
    drafted = OnnxImageEncoder.from_model_files(model_files, threads=1)
    items = []
    for path in seed_eval_photos[::22]:
        buffer = io.BytesIO()
        with Image.open(path) as photo:
            photo.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        items.append(ImageInput(path.name, buffer.getvalue()))
    agreement = [
        float(cosines(left.vector, right.vector))
        for left, right in zip(full.embed_images(items), drafted.embed_images(items), strict=True)
    ]
    assert min(agreement) >= 0.999, agreement
