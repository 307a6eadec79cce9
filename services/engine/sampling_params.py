"""Sampling parameters live in services/common (the gateway validates them without torch)."""
from services.common.sampling_params import (GREEDY_TEMPERATURE, MAX_SEED, MAX_TOP_LOGPROBS,  # noqa: F401
                                             SamplingParams, SamplingParamsError)
