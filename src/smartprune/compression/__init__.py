"""Compressing a model: the engine (sequential and recursive strategies around the stages of
`smartprune.methods`), the allocation of rates by measured sensitivity, and the parameter accounting."""
