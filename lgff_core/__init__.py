"""lgff_core: Local-Global Feature Fusion models and the retrieval pipeline's library.

Layers (each only imports the ones before it):
storage -> data -> models -> train / embed -> index -> metrics -> report; `cli` and `components/` are thin.
"""
__version__ = "0.1.0"
