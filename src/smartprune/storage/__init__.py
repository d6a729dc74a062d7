"""Models on disk: the compressed-model format (`format`), writing it (`save`), reading it back
(`load`), and resolving a MODEL argument (`sources`: folder, GGUF, built-in name, hub id)."""
