"""clipsearch: event-driven image search with ONNX CLIP, FAISS segments and a PostgreSQL catalog."""

__version__ = "0.1.0"
