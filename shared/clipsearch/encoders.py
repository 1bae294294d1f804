"""`OnnxTextEncoder` and `OnnxImageEncoder`: CLIP embeddings from onnxruntime sessions, L2-normalized."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from clipsearch.errors import InvalidImage, ModelFilesInvalid
from clipsearch.model_files import TEXT_GRAPH, VISION_GRAPH, ModelFiles
from clipsearch.ports import ImageInput
from clipsearch.tokenizer import ClipTokenizer

if TYPE_CHECKING:
    from clipsearch.images import ImagePreprocessor, PreparedImage

log = logging.getLogger(__name__)

TEXT_INPUT, TEXT_OUTPUT = "input_ids", "text_embeds"
IMAGE_INPUT, IMAGE_OUTPUT = "pixel_values", "image_embeds"
# int8 ViT-B/32 on 2 cores: 24.0 / 25.8 / 25.9 img/s at batch 1 / 8 / 32 (FACTS.md: 26 / 29 / 21).
DEFAULT_IMAGE_BATCH_SIZE = 8
DEFAULT_TEXT_BATCH_SIZE = 32
# End to end, int8, 2 cores (benchmarks/embed.py, quiet machine): 12 MP JPEGs 28.5 / 27.2 / 36.6 img/s
# with 0 / 1 / 2 decode workers, seed-eval photos 50.4 / 51.8 / 52.9: decoding overlaps inference best
# with two workers.
DEFAULT_DECODE_WORKERS = 2
# `decode_at_low_priority` runs decode threads at nice 19: inference splits each operator evenly over its
# threads and waits for the slowest, so a decode thread holding one core stalls both; at low priority,
# decoding takes only the cycles inference leaves idle. Off until measured on a quiet machine.
LOWEST_NICE = 19

SessionSource = ort.InferenceSession | Callable[[], ort.InferenceSession]


@dataclass(frozen=True)
class TextEmbedding:
    vector: np.ndarray
    token_count: int
    truncated: bool


@dataclass(frozen=True)
class ImageEmbedding:
    """The embedding, the image's original size as displayed (the catalog records it), its thumbnail if asked."""

    vector: np.ndarray
    width: int
    height: int
    thumbnail: bytes | None = None


def create_session(
    graph: Path, threads: int | None = None, spinning: bool = False, spin_microseconds: int = 0
) -> ort.InferenceSession:
    """A CPU session with every graph optimization and denormals flushed to zero. Its worker threads sleep
    between operators unless `spinning`; with `spin_microseconds` they spin at most that long between
    operators and stop spinning when a run ends, so a session that runs one short graph per request
    (the text tower) takes its second core only while it runs."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Denormals slowed an fp32 tower 3-6x in one measurement here (FACTS.md); flushing costs nothing.
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    # Spinning threads steal the cores that decode workers and other processes need. On 2 shared cores,
    # int8 ViT-B/32 image tower, median of 4 interleaved runs: 19.6 -> 25.8 img/s at batch 8 without it.
    spins = spinning or spin_microseconds > 0
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spins else "0")
    if spin_microseconds > 0:
        options.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_microseconds))
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(graph), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own untyped errors for unreadable graphs
        raise ModelFilesInvalid(f"{graph}: onnxruntime cannot load it ({error})") from error


def normalized(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)


class _OnceSession:
    """The session given, or the one `load` creates on first use (once, even with concurrent callers)."""

    def __init__(self, source: SessionSource) -> None:
        self._session = source if isinstance(source, ort.InferenceSession) else None
        self._load = None if self._session is not None else source
        self._lock = threading.Lock()

    def get(self) -> ort.InferenceSession:
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = self._load()
        return self._session


def _loader(
    files: ModelFiles, graph: str, threads: int | None, spin_microseconds: int = 0
) -> Callable[[], ort.InferenceSession]:
    def load() -> ort.InferenceSession:
        files.verify([graph])
        session = create_session(files.directory / graph, threads, spin_microseconds=spin_microseconds)
        dim = session.get_outputs()[0].shape[-1]
        if dim != files.embedding_dim:
            raise ModelFilesInvalid(
                f"{files.directory / graph}: embeds {dim} values, the manifest says {files.embedding_dim}"
            )
        log.info("loaded %s for %s", graph, files.model_id)
        return session

    return load


class OnnxTextEncoder:
    """Runs the text tower at the query's true token length: the tower is causal and pools at
    <|endoftext|>, so padding to 77 gives the same embedding, only slower."""

    def __init__(
        self, tokenizer: ClipTokenizer, session: SessionSource, batch_size: int = DEFAULT_TEXT_BATCH_SIZE
    ) -> None:
        self.tokenizer = tokenizer
        self._session = _OnceSession(session)
        self.batch_size = batch_size

    @classmethod
    def from_model_files(
        cls,
        files: ModelFiles,
        threads: int | None = None,
        open_now: bool = False,
        spin_microseconds: int = 0,
        tokenizer: ClipTokenizer | None = None,
    ) -> OnnxTextEncoder:
        """Loads the tokenizer now (unless given one) and the text graph on first use, or now with
        `open_now`; never touches the vision graph. `spin_microseconds`: as create_session's.

        Loading the tokenizer holds the GIL throughout (~0.2 s, in `tokenizers`), and building a session
        needs it now and then, so the two do not overlap: a caller in a hurry loads the tokenizer while the
        graph is still downloading and hands it in."""
        load = _loader(files, TEXT_GRAPH, threads, spin_microseconds)
        tokenizer = files.tokenizer() if tokenizer is None else tokenizer
        return cls(tokenizer, load() if open_now else load)

    def embed_text(self, text: str) -> TextEmbedding:
        tokenized = self.tokenizer.encode(text)
        vector = self._run(tokenized.ids[np.newaxis, :])[0]
        return TextEmbedding(normalized(vector), len(tokenized.ids), tokenized.truncated)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim]; batches of similar length, each padded with 0 after <|endoftext|>."""
        token_ids = [self.tokenizer.encode(text).ids for text in texts]
        order = np.argsort([len(ids) for ids in token_ids], kind="stable")
        embeddings: np.ndarray | None = None
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = np.zeros((len(chunk), max(len(token_ids[i]) for i in chunk)), dtype=np.int64)
            for row, index in enumerate(chunk):
                batch[row, : len(token_ids[index])] = token_ids[index]
            vectors = self._run(batch)
            if embeddings is None:
                embeddings = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            embeddings[chunk] = normalized(vectors)
        return embeddings if embeddings is not None else np.empty((0, 0), dtype=np.float32)

    def _run(self, input_ids: np.ndarray) -> np.ndarray:
        return self._session.get().run([TEXT_OUTPUT], {TEXT_INPUT: input_ids})[0]


class OnnxImageEncoder:
    """Embeds images in batches while a thread pool decodes the next ones (onnxruntime releases the GIL)."""

    def __init__(
        self,
        preprocessor: ImagePreprocessor,
        session: SessionSource,
        batch_size: int = DEFAULT_IMAGE_BATCH_SIZE,
        decode_workers: int = DEFAULT_DECODE_WORKERS,
        decode_at_low_priority: bool = False,
    ) -> None:
        self.preprocessor = preprocessor
        self._session = _OnceSession(session)
        self.batch_size = batch_size
        self.decode_workers = decode_workers
        self.decode_at_low_priority = decode_at_low_priority

    @classmethod
    def from_model_files(
        cls,
        files: ModelFiles,
        threads: int | None = None,
        max_pixels: int | None = None,
        batch_size: int = DEFAULT_IMAGE_BATCH_SIZE,
        decode_workers: int = DEFAULT_DECODE_WORKERS,
    ) -> OnnxImageEncoder:
        """`max_pixels`: the preprocessor's limit (its default when None). Pillow is imported here, not with
        this module: a search function that answers text queries only never imports it (~40 ms at start)."""
        from clipsearch.images import ImagePreprocessor

        limits = {} if max_pixels is None else {"max_pixels": max_pixels}
        preprocessor = ImagePreprocessor(files.preprocess(), **limits)
        return cls(preprocessor, _loader(files, VISION_GRAPH, threads), batch_size, decode_workers)

    def embed_image(self, data: bytes | Path, name: str) -> ImageEmbedding:
        """Raises InvalidImage (or ImageTooLarge) naming the image and the reason."""
        prepared = self.preprocessor.prepare(data, name)
        return self._embed_batch([prepared])[0]

    def embed_images(self, items: Sequence[ImageInput]) -> list[ImageEmbedding | InvalidImage]:
        """One result per input, in order: an embedding, or the InvalidImage that input raised."""
        results: list[ImageEmbedding | InvalidImage | None] = [None] * len(items)
        waiting: list[tuple[int, PreparedImage]] = []
        for index, outcome in self._prepared(items):
            if isinstance(outcome, InvalidImage):
                results[index] = outcome
                continue
            waiting.append((index, outcome))
            if len(waiting) == self.batch_size:
                self._embed_into(results, waiting)
                waiting = []
        if waiting:
            self._embed_into(results, waiting)
        return results  # type: ignore[return-value]  # every slot is filled above

    def _embed_into(self, results: list, waiting: list[tuple[int, PreparedImage]]) -> None:
        embeddings = self._embed_batch([prepared for _, prepared in waiting])
        for (index, _), embedding in zip(waiting, embeddings, strict=True):
            results[index] = embedding

    def _prepare(self, item: ImageInput) -> PreparedImage | InvalidImage:
        try:
            return self.preprocessor.prepare(item.data, item.name, item.thumbnail_side)
        except InvalidImage as error:
            log.info("skipping %s", error)
            return error

    def _prepared(self, items: Sequence[ImageInput]) -> Iterator[tuple[int, PreparedImage | InvalidImage]]:
        """Decoded images in input order; workers stay one batch ahead so memory stays bounded."""
        if self.decode_workers <= 0:
            for index, item in enumerate(items):
                yield index, self._prepare(item)
            return
        ahead = self.batch_size + self.decode_workers
        lower = _lower_this_thread_priority if self.decode_at_low_priority else None
        with ThreadPoolExecutor(self.decode_workers, thread_name_prefix="decode", initializer=lower) as pool:
            pending: deque[tuple[int, Future[PreparedImage | InvalidImage]]] = deque()
            upcoming = iter(enumerate(items))
            for index, item in upcoming:
                pending.append((index, pool.submit(self._prepare, item)))
                if len(pending) >= ahead:
                    break
            while pending:
                index, future = pending.popleft()
                following = next(upcoming, None)
                if following is not None:
                    pending.append((following[0], pool.submit(self._prepare, following[1])))
                yield index, future.result()

    def _embed_batch(self, batch: list[PreparedImage]) -> list[ImageEmbedding]:
        pixels = np.stack([prepared.pixel_values for prepared in batch])
        vectors = normalized(self._session.get().run([IMAGE_OUTPUT], {IMAGE_INPUT: pixels})[0])
        return [
            ImageEmbedding(vector, prepared.width, prepared.height, prepared.thumbnail)
            for vector, prepared in zip(vectors, batch, strict=True)
        ]


def _lower_this_thread_priority() -> None:
    """Linux gives each thread its own nice value; elsewhere setpriority would lower the whole process."""
    if sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_NICE)
