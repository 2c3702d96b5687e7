"""The algorithm core: pure tensor functions shared by the vLLM plugin and the transformers backend.

Pruners take signals (scores, features, geometry) and return which tokens to keep or what to merge
(:class:`vlmprune.core.select.TokenReduction`); they never touch a model.
"""
