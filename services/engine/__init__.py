"""The model engine shared by every worker role (no gRPC, no asyncio)."""
from .config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from .sampling_params import SamplingParams


def __getattr__(name):
    # Engine pulls in torch models and the loader: import it only when asked.
    if name in ("Engine", "GenerateResult", "StepOutput"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(name)


__all__ = ["CacheConfig", "Engine", "EngineConfig", "ModelConfig", "SamplingParams", "SchedulerConfig"]
