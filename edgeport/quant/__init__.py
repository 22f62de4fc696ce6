"""Post-training quantization: quantizers, calibration, reparameterization, the pipeline."""
