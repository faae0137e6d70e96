"""Serving: what runs inside Ray Serve, and stands alone (it imports neither `controller` nor `checks`).

The release schema's serving part (`schema`, `fields`, `samplers`), model files from a store to the verified
cache (`stores`, `manifest`, `artifacts`, `model_cache`, `cache_eviction`), the pipeline (`pipeline`,
`generator`), requests (`requests`), the model deployment and the router (`model_server`, `router`) and
their metrics (`metrics`).
"""
