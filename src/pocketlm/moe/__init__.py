"""On-device mixture of experts: experts offloaded to a store and cached under a memory budget
(`offload_experts`), expert-wise bit widths (`bits`), dynamic top-k (`Routing`), routing diagnostics
(`routing`), and MoEfication of dense models (`moefy`)."""
from .block import Routing
from .runtime import offload_experts

__all__ = ["Routing", "offload_experts"]
