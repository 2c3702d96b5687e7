"""The OpenAI-compatible FastAPI gateway: headers -> policy, metrics, upstream routing.

``server.app.create_app(settings)`` builds the app; ``server.launcher`` is ``vlmprune serve``
(vLLM child + gateway). Per resource a router and a serving module (``server.chat``,
``server.models``, ``server.ops``); shared pieces: ``config`` (settings), ``policies`` (named
policies, precedence, load-adaptive ratio), ``upstreams`` (health, least-loaded routing),
``images`` (data URLs), ``model_info`` (visual tokens and FLOPs), ``metrics``, ``errors``, ``auth``.
"""
