"""Train a small CLIP on procedural captioned shapes, so offline search has a model that retrieves by meaning.

    python -m model_export.train_small_clip --out model_export/small_clip --seed 0

A Hugging Face CLIPModel with a small config and the real CLIP BPE tokenizer (49,408 tokens), trained
contrastively on images from clipsearch_tools.demo_images (held-out colour/shape pairs never shown). Images
go through the runtime's own JPEG decoding and preprocessing. The directory written is an ordinary
checkpoint (safetensors, tokenizer and preprocessor files) for `python -m model_export --model DIR`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizerFast

from clipsearch.images import ImagePreprocessor, PreprocessConfig
from clipsearch_tools import demo_images
from model_export import clip_vocab
from model_export.checkpoint import preprocess_config

log = logging.getLogger("model_export.train_small_clip")


@dataclass(frozen=True)
class TrainingPlan:
    seed: int = 0
    steps: int = 3000
    batch_size: int = 96
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    pool_images: int = 6000
    image_size: int = 64
    patch_size: int = 8
    text_width: int = 64
    vision_width: int = 64
    layers: int = 3
    heads: int = 4
    projection_dim: int = 64
    # One thread: on the shared 2 cores (load ~10) a second thread spun and cost 6x the CPU per step.
    threads: int = 1
    eval_images: int = 288


def clip_config(plan: TrainingPlan) -> CLIPConfig:
    """The text token embedding (49,408 x text_width) is most of the parameters: keep text_width small."""
    return CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": plan.text_width, "intermediate_size": 4 * plan.text_width,
                     "num_hidden_layers": plan.layers, "num_attention_heads": plan.heads,
                     "max_position_embeddings": 77},
        vision_config={"image_size": plan.image_size, "patch_size": plan.patch_size,
                       "hidden_size": plan.vision_width, "intermediate_size": 4 * plan.vision_width,
                       "num_hidden_layers": plan.layers, "num_attention_heads": plan.heads},
        projection_dim=plan.projection_dim,
    )


def image_processor(plan: TrainingPlan) -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": plan.image_size},
                              crop_size={"height": plan.image_size, "width": plan.image_size})


class CaptionTokens:
    """Captions to padded id tensors with the CLIP tokenizer, cached (the phrasings repeat)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}
        self._end = tokenizer.token_to_id(clip_vocab.END_OF_TEXT)

    def batch(self, texts: list[str]) -> torch.Tensor:
        ids = [self._ids(text) for text in texts]
        longest = max(len(row) for row in ids)
        # Padding with end-of-text is harmless: the mask is causal and CLIP pools at the first end-of-text.
        return torch.tensor([row + [self._end] * (longest - len(row)) for row in ids], dtype=torch.long)

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self._tokenizer.encode(text.lower()).ids
        return self._cache[text]


def render_pool(count: int, seed: int, preprocessor: ImagePreprocessor,
                held_out: bool | None) -> tuple[list[demo_images.ShapeScene], torch.Tensor]:
    """Scenes and their pixel values, each drawn, saved as a JPEG and read back as the runtime reads it."""
    rng = random.Random(seed)
    scenes, pixels = [], []
    for scene, image in demo_images.scenes(count, seed, held_out):
        encoded = io.BytesIO()
        image.save(encoded, format="JPEG", quality=rng.randint(75, 95))
        scenes.append(scene)
        pixels.append(preprocessor.prepare(encoded.getvalue(), scene.label).pixel_values)
    return scenes, torch.from_numpy(np.stack(pixels))


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                     matches: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with every matching pair in the batch a positive (not only the diagonal).

    Two images of a red circle are both right for "a red circle": treating one as a negative would
    teach the model to tell apart what the captions do not.
    """
    logits = logit_scale.exp().clamp(max=100) * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
    image_targets = matches / matches.sum(dim=1, keepdim=True)
    text_targets = matches.T / matches.T.sum(dim=1, keepdim=True)
    image_loss = -(image_targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    text_loss = -(text_targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (image_loss + text_loss) / 2


def train(plan: TrainingPlan, out: Path) -> dict:
    """Train, evaluate on held-out pairs, save the checkpoint at `out`; returns the training record."""
    started = time.monotonic()
    torch.manual_seed(plan.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(plan.threads)
    torch.set_flush_denormal(True)
    rng = random.Random(plan.seed)
    processor = image_processor(plan)
    preprocessor = ImagePreprocessor(PreprocessConfig.from_dict(preprocess_config(processor)))
    tokenizer = Tokenizer.from_str(clip_vocab.build_tokenizer_json())
    tokens = CaptionTokens(tokenizer)

    scenes, pixels = render_pool(plan.pool_images, plan.seed, preprocessor, held_out=False)
    log.info("rendered %d training images (held-out pairs excluded) in %.1f s", len(scenes), time.monotonic() - started)
    model = CLIPModel(clip_config(plan))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    log.info("CLIP with %d parameters (%.2f M)", parameters, parameters / 1e6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.learning_rate, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _learning_rate_factor(plan, step))

    losses = []
    model.train()
    for step in range(1, plan.steps + 1):
        batch = rng.sample(range(len(scenes)), plan.batch_size)
        batch_scenes = [scenes[index] for index in batch]
        captions = [demo_images.sample_caption(scene, rng) for scene in batch_scenes]
        matches = torch.tensor([[float(caption.matches(scene)) for caption in captions] for scene in batch_scenes])
        output = model(input_ids=tokens.batch([caption.text for caption in captions]), pixel_values=pixels[batch])
        loss = contrastive_loss(output.image_embeds, output.text_embeds, model.logit_scale, matches)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == 1:
            log.info("step %d/%d loss %.4f (mean of last 50 %.4f) lr %.2e, %.0f s", step, plan.steps, losses[-1],
                     float(np.mean(losses[-50:])), schedule.get_last_lr()[0], time.monotonic() - started)
    training_seconds = time.monotonic() - started

    model.eval()
    evaluation = evaluate(model, tokens, preprocessor, plan)
    save(model, tokenizer, processor, out)
    window = max(1, min(50, plan.steps // 4))
    record = {"plan": asdict(plan), "parameters": parameters, "training_seconds": round(training_seconds, 1),
              "first_loss": round(float(np.mean(losses[:window])), 4),
              "final_loss": round(float(np.mean(losses[-window:])), 4),
              "evaluation": evaluation}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def evaluate(model: CLIPModel, tokens: CaptionTokens, preprocessor: ImagePreprocessor, plan: TrainingPlan) -> dict:
    """P@1/P@5 of "a <colour> <shape>" text queries over fresh images of every pair, held-out pairs apart."""
    gallery, pixels = render_pool(plan.eval_images, plan.seed + 1000, preprocessor, held_out=None)
    pairs = [(colour, shape) for colour in demo_images.COLOURS for shape in demo_images.SHAPES]
    with torch.no_grad():
        image_embeds = F.normalize(model.get_image_features(pixel_values=pixels), dim=-1)
        text_embeds = F.normalize(model.get_text_features(input_ids=tokens.batch(
            [f"a {colour} {shape}" for colour, shape in pairs])), dim=-1)
    ranking = (text_embeds @ image_embeds.T).argsort(dim=1, descending=True)
    figures = {}
    for name, wanted in (("held_out", True), ("seen", False)):
        rows = [row for row, pair in enumerate(pairs) if (pair in demo_images.HELD_OUT) == wanted]
        for k in (1, 5):
            hits = [sum(gallery[index].label == "-".join(pairs[row]) for index in ranking[row, :k].tolist()) / k
                    for row in rows]
            figures[f"{name}_text_p_at_{k}"] = round(float(np.mean(hits)), 4)
    log.info("text -> image on %d fresh images: %s", len(gallery), figures)
    return figures


def save(model: CLIPModel, tokenizer: Tokenizer, processor: CLIPImageProcessor, out: Path) -> None:
    """save_pretrained in float16 (half the size; the exporter loads float32), tokenizer and preprocessor files."""
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out, safe_serialization=True)
    model.float()
    CLIPTokenizerFast(tokenizer_object=tokenizer, bos_token=clip_vocab.START_OF_TEXT, eos_token=clip_vocab.END_OF_TEXT,
                      pad_token=clip_vocab.END_OF_TEXT, unk_token=clip_vocab.END_OF_TEXT).save_pretrained(out)
    processor.save_pretrained(out)


def _learning_rate_factor(plan: TrainingPlan, step: int) -> float:
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    progress = (step - plan.warmup_steps) / max(1, plan.steps - plan.warmup_steps)
    return 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))


def main(argv: list[str] | None = None) -> int:
    defaults = TrainingPlan()
    parser = argparse.ArgumentParser(prog="python -m model_export.train_small_clip", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    record = train(TrainingPlan(**args), out)
    log.info("trained in %.1f s: mean loss %.4f (first steps) -> %.4f (last steps), checkpoint at %s", record["training_seconds"],
             record["first_loss"], record["final_loss"], out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
