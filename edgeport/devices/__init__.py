"""Devices: the catalog of specs (each number with its source) and the roofline estimator."""
