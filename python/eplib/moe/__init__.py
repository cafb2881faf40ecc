"""The MoE layer: router with auxiliary-loss-free balancing, gated-FFN (SwiGLU) experts, and
expert-parallel (``"ep"``), token-parallel (``"tp"``) or automatic placement across ranks; loading
from and writing to transformers' MoE blocks (``hf``); data parallelism with DDP or FSDP2 around it
(``ddp``, ``fully_shard_dense``)."""

from . import hf
from .balancer import Balancer
from .data_parallel import ddp, expert_parameters, fully_shard_dense, local_state_names, reduce_expert_grads
from .experts import ACTIVATIONS, Experts, SharedExperts, gated_ffn, run_experts, swiglu
from .layer import MoE, ep_bytes, tp_bytes
from .router import Router, RouterOutput, max_violation, max_violation_floor

__all__ = ["MoE", "Router", "RouterOutput", "Balancer", "Experts", "SharedExperts", "run_experts", "swiglu",
           "gated_ffn", "ACTIVATIONS", "max_violation", "max_violation_floor", "ep_bytes", "tp_bytes", "hf", "ddp",
           "fully_shard_dense", "expert_parameters", "local_state_names", "reduce_expert_grads"]
