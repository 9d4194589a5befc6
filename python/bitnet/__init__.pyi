from os import PathLike
from typing import Any, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

__version__: str

_Path = Union[str, "PathLike[str]"]

class BitnetError(Exception):
    """Every error of bitnet-rs."""

class ModelLoadError(BitnetError):
    """A model file or folder that cannot be read, or a bad artifact."""

class InvalidArgumentError(BitnetError):
    """An argument out of range or of the wrong kind."""

class ContextFullError(BitnetError):
    """The prompt does not fit the context, or the KV budget is full."""

class Stream(Iterator[str]):
    """Text pieces of one generation as they are made; dropping it ends it."""
    def __iter__(self) -> "Stream": ...
    def __next__(self) -> str: ...
    def close(self) -> None: ...

class Model:
    """A loaded model: a GGUF file, a Hugging Face folder or a `.bnx` artifact.

    `threads=None` uses every core and the ISA is the CLI's default, so
    results equal `bitnet run`'s; `tune=True` takes tiles from the tuning
    database (it never starts a sweep). `packing` packs the ternary weights
    2 or 1.6 bits a weight (lossless either way; default: the tuning
    database's choice, else 2 bits). `parallel` sizes the KV cache for
    that many calls at once (or give `kv_budget` in bytes); `cache_type`
    "f16" keeps keys and values in half the bytes (rounded; CPU only).
    """
    def __init__(
        self,
        path: _Path,
        *,
        device: Literal["cpu", "cuda"] = "cpu",
        threads: Optional[int] = None,
        head: Literal["stored", "q8", "q4"] = "stored",
        tune: bool = True,
        context: Optional[int] = None,
        backend: Literal["compiled", "interp"] = "compiled",
        isa: Optional[Literal["scalar", "avx2", "avx512vnni", "cranelift"]] = None,
        packing: Optional[Literal["2bit", "1.6bit"]] = None,
        chat_template: Optional[str] = None,
        parallel: int = 4,
        kv_budget: Optional[int] = None,
        cache_type: Literal["f32", "f16"] = "f32",
    ) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> "Model": ...
    def __exit__(self, *args: Any) -> bool: ...
    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Optional[Sequence[str]] = None,
        ignore_eos: bool = False,
        logit_bias: Optional[Mapping[int, float]] = None,
        response_format: Optional[Mapping[str, Any]] = None,
        grammar: Optional[str] = None,
    ) -> str: ...
    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Optional[Sequence[str]] = None,
        ignore_eos: bool = False,
        logit_bias: Optional[Mapping[int, float]] = None,
        response_format: Optional[Mapping[str, Any]] = None,
        grammar: Optional[str] = None,
    ) -> List[int]: ...
    def stream(
        self,
        prompt: str,
        *,
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Optional[Sequence[str]] = None,
        ignore_eos: bool = False,
        logit_bias: Optional[Mapping[int, float]] = None,
        response_format: Optional[Mapping[str, Any]] = None,
        grammar: Optional[str] = None,
    ) -> Stream: ...
    def chat(
        self,
        messages: List[Dict[str, str]],
        *,
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Optional[Sequence[str]] = None,
        logit_bias: Optional[Mapping[int, float]] = None,
        response_format: Optional[Mapping[str, Any]] = None,
        grammar: Optional[str] = None,
    ) -> str: ...
    def tokenize(self, text: str, add_bos: bool = True) -> List[int]: ...
    def detokenize(self, ids: Sequence[int]) -> str: ...
    def logits(self, ids: Sequence[int]) -> npt.NDArray[np.float32]: ...
    @property
    def info(self) -> Dict[str, Any]: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def n_ctx(self) -> int: ...

def compile(
    src: _Path,
    out: _Path,
    *,
    threads: Optional[int] = None,
    head: Literal["stored", "q8", "q4"] = "stored",
    tune: bool = True,
    context: Optional[int] = None,
    isa: Optional[Literal["scalar", "avx2", "avx512vnni", "cranelift"]] = None,
    packing: Optional[Literal["2bit", "1.6bit"]] = None,
) -> Dict[str, Any]: ...
