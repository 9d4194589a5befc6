"""bitnet-rs from Python: load a ternary (BitNet b1.58) model and generate.

>>> import bitnet
>>> with bitnet.Model("model.gguf") as m:
...     print(m.generate("Once upon a time", max_tokens=20, temperature=0))
"""

from ._bitnet import (
    BitnetError,
    ContextFullError,
    InvalidArgumentError,
    Model,
    ModelLoadError,
    Stream,
    __version__,
    compile,
)

__all__ = [
    "BitnetError",
    "ContextFullError",
    "InvalidArgumentError",
    "Model",
    "ModelLoadError",
    "Stream",
    "__version__",
    "compile",
]
