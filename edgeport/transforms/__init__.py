"""Model -> model transforms applied before any backend: slimming, spiking forms."""
