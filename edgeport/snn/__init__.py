"""Spiking neurons written as plain elementwise ops, so that every exporter can take them."""
from edgeport.snn.neurons import LIF, atan_spike

__all__ = ["LIF", "atan_spike"]
