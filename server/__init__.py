"""The OpenAI-compatible FastAPI gateway (headers -> policy, metrics, upstream routing).

Not built yet: tracked by the gateway issue. Until then ``make serve`` runs the transformers
reference backend on a demo request (``vlmprune/serve_demo.py``).
"""
