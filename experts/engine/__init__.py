"""The continuous-batching generation engine, in parts that read alone:

* `request`   - the typed contract: GenerationRequest, SamplingParams, TokenEvent (picklable for Ray)
* `scheduler` - admission: the waiting queue and how many rows join each step
* `batch`     - the running rows and their left-padded KV cache and attention mask
* `sampler`   - greedy / temperature / top-p sampling per row
* `output`    - detokenization, stop strings and their holdback
* `core`      - GenerationEngine: the engine thread's loop and the consumer APIs
"""

from experts.engine.core import GenerationEngine
from experts.engine.request import Completion, GenerationRequest, SamplingParams, Sink, TokenEvent

__all__ = ["Completion", "GenerationEngine", "GenerationRequest", "SamplingParams", "Sink", "TokenEvent"]
