"""vLLM general-plugin entry point (``vllm.general_plugins``: ``vlmprune = vlmprune.plugin:register``).

vLLM calls :func:`register` in every process it starts. The model subclasses and processors that
make pruning happen inside vLLM are the vLLM-plugin issue's work; until they land, registering
changes nothing in vLLM, so an installed vlmprune never alters stock behaviour.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def register() -> None:
    """Re-entrant and import-safe; registers nothing yet (see the module docstring)."""
    logger.debug("vlmprune vLLM plugin: no model overrides registered in this version")
