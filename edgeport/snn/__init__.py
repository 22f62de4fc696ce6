"""Spiking networks: neurons as plain elementwise ops with explicit state, conversion of
snnTorch and SpikingJelly networks, and spike statistics with the energy they imply."""
from edgeport.snn.neurons import (LIF, NEURONS, Alpha, Lapicque, Leaky, MultiLevel, ParametricLIF, RecurrentLeaky,
                                  RecurrentSynaptic, Synaptic, atan_spike)

__all__ = ["LIF", "NEURONS", "Alpha", "Lapicque", "Leaky", "MultiLevel", "ParametricLIF", "RecurrentLeaky",
           "RecurrentSynaptic", "Synaptic", "atan_spike"]
