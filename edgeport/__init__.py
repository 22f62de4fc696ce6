"""edgeport: get trained PyTorch models onto edge devices — export, verify, profile.

The SDK facade; see `edgeport.sdk` for the calls and DESIGN.md for the flow.
"""
__version__ = "0.1.0"

from edgeport import zoo  # noqa: E402
from edgeport.errors import (BackendUnavailable, CheckFailed, EdgeportError, EdgeportWarning, ExportError,  # noqa: E402
                             UserError)
from edgeport.core import Artifact, ParityReport, Tolerance  # noqa: E402
from edgeport.sdk import (estimate, export, load_model, profile, quantize, slim, spike_statistics,  # noqa: E402
                          verify)
from edgeport.fleet import sweep  # noqa: E402

__all__ = ["Artifact", "BackendUnavailable", "CheckFailed", "EdgeportError", "EdgeportWarning", "ExportError",
           "ParityReport", "Tolerance", "UserError", "estimate", "export", "load_model", "profile", "quantize", "slim", "spike_statistics", "sweep", "verify", "zoo", "__version__"]
