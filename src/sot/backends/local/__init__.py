"""The embedded local backend: SmolLM2 on llama.cpp with continuous batching and a shared-prefix KV cache.

Importing this package does not load llama.cpp; the model loads on first use.
"""

from sot.backends.local.backend import LocalBackend
from sot.backends.local.chat_template import SMOLLM2_DEFAULT_SYSTEM, ChatMLTemplate
from sot.backends.local.model_files import default_cache_dir, packaged_model_path

__all__ = [
    "SMOLLM2_DEFAULT_SYSTEM",
    "ChatMLTemplate",
    "LocalBackend",
    "default_cache_dir",
    "packaged_model_path",
]
