"""clipsearch's tools: the `clipsearch` command, its client of a stack and the local stack (never in the Lambda layer)."""
