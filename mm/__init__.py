"""mm: image, video and speech encoders attached to a frozen Llama decoder through adapters.

    import mm
    model = mm.load("smollm2")
    model.generate("What is shown?", images=["a.jpg"])
"""
from mm.errors import CheckpointError, ConfigError, InputError

__all__ = ["load", "build", "MultimodalModel", "InputError", "ConfigError", "CheckpointError"]


def __getattr__(name: str):
    # The model is imported on first use, so that the encoder packages (vision/, video/) can
    # import mm.errors without importing the model that imports them.
    if name in ("load", "build"):
        from mm import api

        return getattr(api, name)
    if name == "MultimodalModel":
        from mm.model import MultimodalModel

        return MultimodalModel
    raise AttributeError(f"module 'mm' has no attribute {name!r}")
