"""Split a CLIPModel into its text and vision towers (each with its projection) and export each to ONNX."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import onnx
from optimum.exporters.onnx import onnx_export_from_model
from optimum.exporters.onnx.model_configs import CLIPTextWithProjectionOnnxConfig, CLIPVisionModelOnnxConfig
from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from clipsearch.model_files import TEXT_GRAPH, VISION_GRAPH

log = logging.getLogger(__name__)


class TextEmbedsOnnxConfig(CLIPTextWithProjectionOnnxConfig):
    """The text tower graph: input_ids [batch, sequence] -> text_embeds [batch, dim], nothing else."""

    @property
    def outputs(self) -> dict[str, dict[int, str]]:
        return {"text_embeds": {0: "batch_size"}}


class ImageEmbedsOnnxConfig(CLIPVisionModelOnnxConfig):
    """The vision tower graph: pixel_values [batch, 3, size, size] -> image_embeds [batch, dim]."""

    @property
    def inputs(self) -> dict[str, dict[int, str]]:
        return {"pixel_values": {0: "batch_size"}}

    @property
    def outputs(self) -> dict[str, dict[int, str]]:
        return {"image_embeds": {0: "batch_size"}}


# The text tower is traced with transformers' plain ("eager") attention rather than
# scaled_dot_product_attention: the same arithmetic, but its ONNX subgraph (scores = Q.K^T * scale + mask) is
# the one onnxruntime's CLIP attention fusion recognises (model_export.fusion); the SDPA trace scales Q and K
# apart and slices a mask, and matches nothing. The vision tower is not fused (no gain measured), so it keeps
# the default trace and exports exactly as before.
FUSABLE_ATTENTION = "eager"


def text_tower(clip: CLIPModel) -> CLIPTextModelWithProjection:
    # Built from the loaded model rather than re-read from disk: a tower config's own projection_dim can
    # disagree with the top-level one (it defaults to 512), and random models have no directory at all.
    config = copy.deepcopy(clip.config.text_config)
    config.projection_dim = clip.config.projection_dim
    config._attn_implementation = FUSABLE_ATTENTION
    tower = CLIPTextModelWithProjection(config)
    tower.text_model.load_state_dict(clip.text_model.state_dict())
    tower.text_projection.load_state_dict(clip.text_projection.state_dict())
    return tower.eval()


def vision_tower(clip: CLIPModel) -> CLIPVisionModelWithProjection:
    config = copy.deepcopy(clip.config.vision_config)
    config.projection_dim = clip.config.projection_dim
    tower = CLIPVisionModelWithProjection(config)
    tower.vision_model.load_state_dict(clip.vision_model.state_dict())
    tower.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return tower.eval()


def export_towers(clip: CLIPModel, directory: Path, opset: int | None) -> int:
    """Write text/model.onnx and vision/model.onnx under `directory`; return the opset actually used."""
    for tower, onnx_config, graph in (
        (text_tower(clip), TextEmbedsOnnxConfig, TEXT_GRAPH),
        (vision_tower(clip), ImageEmbedsOnnxConfig, VISION_GRAPH),
    ):
        scratch = directory / f".optimum-{Path(graph).parent.name}"
        log.info("exporting %s", graph)
        onnx_export_from_model(
            tower,
            scratch,
            opset=opset,
            task="feature-extraction",
            custom_onnx_configs={"model": onnx_config(tower.config, task="feature-extraction")},
            do_validation=False,
        )
        target = directory / graph
        target.parent.mkdir(parents=True, exist_ok=True)
        for produced in scratch.glob("model.onnx*"):
            produced.rename(target.parent / produced.name)
        shutil.rmtree(scratch)
    return graph_opset(directory / TEXT_GRAPH)


def graph_opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
