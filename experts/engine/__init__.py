"""The continuous-batching generation engine, in parts that read alone:

* `request`   - the typed contract: GenerationRequest, SamplingParams, TokenEvent (picklable for Ray)
* `scheduler` - admission: the waiting queue and how many rows join each step
* `batch`     - the running rows and their left-padded KV cache and attention mask
* `sampler`   - penalties, logit_bias, greedy / temperature / top-p sampling and logprobs, batched
* `output`    - detokenization, stop strings and their holdback
* `core`      - GenerationEngine: the engine thread's loop and the consumer APIs
"""

from experts.engine.core import GenerationEngine
from experts.engine.request import (
    Completion,
    GenerationRequest,
    RowTiming,
    SamplingParams,
    Sink,
    TokenEvent,
    TokenLogprob,
)

__all__ = ["Completion", "GenerationEngine", "GenerationRequest", "RowTiming", "SamplingParams", "Sink", "TokenEvent",
           "TokenLogprob"]
