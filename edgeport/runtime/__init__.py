"""Running artifacts: one Runner per backend, latency measurement."""
