"""sot: Skeleton-of-Thought for any LLM: write a skeleton, expand its points in parallel, stream the answer."""

from sot.backends import Backend, GenerationRequest, Message, SamplingParams, create_backend
from sot.engine import Engine, EngineConfig
from sot.errors import SoTError
from sot.events import Event, Result

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "Engine",
    "EngineConfig",
    "Event",
    "GenerationRequest",
    "Message",
    "Result",
    "SamplingParams",
    "SoTError",
    "__version__",
    "create_backend",
]
