"""Engine exceptions -> gRPC status codes, with the field at fault named."""
from __future__ import annotations

import grpc

from services.engine.engine import EngineError
from services.engine.sampling_params import SamplingParamsError


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    if isinstance(exc, SamplingParamsError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{exc.field}: {exc}"
    if isinstance(exc, EngineError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"prompt_ids: {exc}"
    return None


async def abort_for(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """Abort the RPC with the status this exception maps to; re-raise others."""
    st = status_of(exc)
    if st is None:
        raise exc
    await context.abort(*st)
