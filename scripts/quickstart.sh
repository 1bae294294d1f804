#!/usr/bin/env bash
# From a fresh clone to search results: install, start the local stack (which exports and publishes the
# model on first run), ingest a folder of images, then search it by text and by image.
# Offline (the stack serves the small CLIP trained here on coloured shapes) it ingests a generated dataset
# of such shapes instead, which that model understands.
#   scripts/quickstart.sh [IMAGE_DIR] [QUERY_IMAGE]
set -euo pipefail
cd "$(dirname "$0")/.."

images=${1:-../shared/datasets/seed-eval/train}
query_image=${2:-../shared/datasets/seed-eval/val/beach.jpeg}
text_query="a lion in the grasslands"

bash scripts/bootstrap.sh
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-local} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-local}
clipsearch=.venv/bin/clipsearch

$clipsearch local up
model_id=$($clipsearch local status --json | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["model_id"])')
if [[ $model_id == small_clip* && $# -eq 0 ]]; then
  echo
  echo "quickstart: the model is $model_id, the small CLIP trained here on coloured shapes (the hub was"
  echo "unreachable): generating a demo dataset of such shapes to search."
  images=.cache/demo-shapes/images
  .venv/bin/python -m clipsearch_tools.demo_images --out "$images" --queries .cache/demo-shapes/queries --count 288
  query_image=.cache/demo-shapes/queries/blue-heart.jpg
  text_query="a red star"
fi
if [ ! -d "$images" ]; then
  echo "quickstart: no image folder at $images; pass one: scripts/quickstart.sh IMAGE_DIR [QUERY_IMAGE]" >&2
  exit 2
fi
$clipsearch ingest "$images" --dataset demo
echo
echo "\$ clipsearch search text \"$text_query\" --dataset demo -k 5    (model $model_id)"
$clipsearch search text "$text_query" --dataset demo -k 5
if [ -f "$query_image" ]; then
  echo
  echo "\$ clipsearch search image $query_image --dataset demo -k 5"
  $clipsearch search image "$query_image" --dataset demo -k 5
fi
if [[ $images == .cache/demo-shapes/images ]]; then
  echo
  echo '$ clipsearch evaluate --queries .cache/demo-shapes/queries --dataset demo    (one query image per colour/shape)'
  $clipsearch evaluate --queries .cache/demo-shapes/queries --dataset demo
fi
echo
echo "The local stack keeps running: '.venv/bin/clipsearch local status', '.venv/bin/clipsearch local down'."
