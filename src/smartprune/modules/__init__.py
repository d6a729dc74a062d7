"""What a compressed model is made of: masked, folded and packed projections, the structured
attention and projections that run the structure, semi-structured (2:4) projections, low-rank heads.
These modules know nothing of model families; the adapters decide where they go."""
