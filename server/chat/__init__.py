"""``POST /v1/chat/completions``: router (HTTP), protocol (schemas), serving (the logic)."""
