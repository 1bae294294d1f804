"""Export a CLIP checkpoint into a clipsearch model directory: two ONNX towers, tokenizer, preprocess, manifest."""
