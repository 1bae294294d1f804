#!/usr/bin/env bash
# From a fresh clone to search results: install, start the local stack (which exports and publishes the
# model on first run), ingest a folder of images, then search it by text and by image.
#   scripts/quickstart.sh [IMAGE_DIR] [QUERY_IMAGE]
set -euo pipefail
cd "$(dirname "$0")/.."

images=${1:-../shared/datasets/seed-eval/train}
query_image=${2:-../shared/datasets/seed-eval/val/beach.jpeg}
if [ ! -d "$images" ]; then
  echo "quickstart: no image folder at $images; pass one: scripts/quickstart.sh IMAGE_DIR [QUERY_IMAGE]" >&2
  exit 2
fi

bash scripts/bootstrap.sh
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-local} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-local}
clipsearch=.venv/bin/clipsearch

$clipsearch local up
$clipsearch ingest "$images" --dataset demo
echo
echo '$ clipsearch search text "a lion in the grasslands" --dataset demo -k 5'
$clipsearch search text "a lion in the grasslands" --dataset demo -k 5
if [ -f "$query_image" ]; then
  echo
  echo "\$ clipsearch search image $query_image --dataset demo -k 5"
  $clipsearch search image "$query_image" --dataset demo -k 5
fi
echo
echo "The local stack keeps running: '.venv/bin/clipsearch local status', '.venv/bin/clipsearch local down'."
