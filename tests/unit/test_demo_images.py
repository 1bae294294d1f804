"""The procedural shapes: deterministic for a seed, captions true of their image, held-out pairs kept out of training."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from clipsearch_tools import demo_images
from clipsearch_tools.cli.evaluate import label_of


def test_the_same_seed_draws_the_same_images_and_another_seed_does_not():
    first = [np.asarray(image) for _, image in demo_images.scenes(5, seed=7)]
    again = [np.asarray(image) for _, image in demo_images.scenes(5, seed=7)]
    other = [np.asarray(image) for _, image in demo_images.scenes(5, seed=8)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_training_scenes_never_show_a_held_out_pair_and_held_out_scenes_always_do():
    rng = random.Random(0)
    assert not any((s.colour, s.shape) in demo_images.HELD_OUT for s in (demo_images.random_scene(rng) for _ in range(500)))
    assert all((s.colour, s.shape) in demo_images.HELD_OUT
               for s in (demo_images.random_scene(rng, held_out=True) for _ in range(50)))


def test_every_caption_is_true_of_its_scene_and_names_what_it_matches():
    scene = demo_images.ShapeScene("red", "star", "small", "top left", "dotted")
    texts = {caption.text for caption in demo_images.captions(scene)}
    assert {"a red star", "small red star on a dotted background", "a red star in the top left"} <= texts
    assert all(caption.matches(scene) for caption in demo_images.captions(scene))
    blue = demo_images.ShapeScene("blue", "star", "small", "top left", "dotted")
    assert [caption.text for caption in demo_images.captions(scene) if caption.matches(blue)] == ["a star"]


def test_the_dataset_names_carry_the_label_and_the_shape_is_drawn_in_its_colour(tmp_path: Path):
    written = demo_images.write_dataset(tmp_path / "images", 48, seed=1, queries=tmp_path / "queries")
    assert sorted({label_of(path.name) for path in written}) == sorted(
        f"{colour}-{shape}" for colour in demo_images.COLOURS for shape in demo_images.SHAPES)
    assert len(list((tmp_path / "queries").glob("*.jpg"))) == 48
    red = np.asarray(demo_images.render(demo_images.ShapeScene("red", "circle", "large", "centre", "plain"),
                                        random.Random(0))).astype(int)
    reddish = (red[..., 0] > 180) & (red[..., 1] < 80) & (red[..., 2] < 80)
    assert 0.1 < reddish.mean() < 0.4
