"""Server optimizers: how the global model moves given the mean client delta (ABC, registry, one module each)."""

from strategies.server_optimizers.adaptive import (
    AdamOptimizer,
    AdaptiveServerOptimizer,
    AMSGradOptimizer,
    YogiOptimizer,
)
from strategies.server_optimizers.base import Params, ServerOptimizer, StateDict
from strategies.server_optimizers.block_momentum import BlockMomentumOptimizer
from strategies.server_optimizers.fedavg import FedAvgOptimizer
from strategies.server_optimizers.registry import (
    SERVER_OPTIMIZERS,
    ServerOptimizerSpec,
    build_server_optimizer,
)

__all__ = [
    "SERVER_OPTIMIZERS",
    "AMSGradOptimizer",
    "AdamOptimizer",
    "AdaptiveServerOptimizer",
    "BlockMomentumOptimizer",
    "FedAvgOptimizer",
    "Params",
    "ServerOptimizer",
    "ServerOptimizerSpec",
    "StateDict",
    "YogiOptimizer",
    "build_server_optimizer",
]
