"""Retrieval with a trained model: embedding datasets and images, searching an index, explaining hits, and the
search service."""
