"""The async engine: runs one question in normal, SoT or auto mode and streams typed events.

It only orchestrates. Prompts, skeleton parsing, assembly and SoT's decisions come from `sot.core` (pure);
model calls go through the `Backend` protocol (`calls`: deadlines and the contract check), retries through
one policy (`retry`), routing through a `Router`. `reference` is the same algorithm without streaming, the
oracle the tests hold the streaming engine to.
"""

from sot.core.conversation import normalize_conversation
from sot.engine.config import EngineConfig, recommended_sampling
from sot.engine.engine import MODES, Engine, RouterLike
from sot.engine.retry import RetryPolicy
from sot.engine.run import cache_key

__all__ = [
    "MODES",
    "Engine",
    "EngineConfig",
    "RetryPolicy",
    "RouterLike",
    "cache_key",
    "normalize_conversation",
    "recommended_sampling",
]
