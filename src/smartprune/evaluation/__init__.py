"""Quality evaluation (perplexity here; classification and generation build on the same module)."""

from smartprune.evaluation.perplexity import PerplexityResult, perplexity, perplexity_of_ids, windows

__all__ = ["PerplexityResult", "perplexity", "perplexity_of_ids", "windows"]
