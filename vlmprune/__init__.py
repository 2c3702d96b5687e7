"""vlmprune: per-request visual-token pruning and merging for vision-language models.

Importing the package (or ``vlmprune.core``) pulls in neither vLLM nor FastAPI.
"""

from vlmprune.policy import METHOD_NAMES, PolicyError, kept_count, parse_policy

__all__ = ["METHOD_NAMES", "PolicyError", "kept_count", "parse_policy"]
__version__ = "0.1.0"
