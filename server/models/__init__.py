"""``GET /v1/models``: the upstreams' model list, passed through."""
