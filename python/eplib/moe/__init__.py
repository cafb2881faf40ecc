"""The MoE layer: router with auxiliary-loss-free balancing, SwiGLU experts, and expert-parallel
(``"ep"``), token-parallel (``"tp"``) or automatic placement across ranks."""

from .balancer import Balancer
from .experts import Experts, SharedExperts, run_experts, swiglu
from .layer import MoE, ep_bytes, tp_bytes
from .router import Router, RouterOutput, max_violation, max_violation_floor

__all__ = ["MoE", "Router", "RouterOutput", "Balancer", "Experts", "SharedExperts", "run_experts", "swiglu",
           "max_violation", "max_violation_floor", "ep_bytes", "tp_bytes"]
