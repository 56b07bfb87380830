"""One router per resource: each module has `router` (pages) and `api` (JSON under /api/v1)."""
