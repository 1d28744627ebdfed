"""mm: image, video and speech encoders attached to a frozen Llama decoder through adapters.

    import mm
    model = mm.load("smollm2")
    model.generate("What is shown?", images=["a.jpg"])
"""
from mm.api import build, load
from mm.errors import CheckpointError, ConfigError, InputError
from mm.model import MultimodalModel

__all__ = ["load", "build", "MultimodalModel", "InputError", "ConfigError", "CheckpointError"]
