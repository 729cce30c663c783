"""Stage 0, the shared core: everything the three methods stand on, and nothing method-specific.

Errors (:mod:`.errors`), atomic artifact I/O with provenance (:mod:`.io`), dataclass-driven CLI options
(:mod:`.config_args`), the one architecture adapter that knows where each model family keeps its layers,
residual writes, norms and embeddings (:mod:`.adapters`), PyTorch hook context managers (:mod:`.hooks`),
model and tokenizer loading (:mod:`.models`), chat-template formatting with post-instruction tokens
(:mod:`.prompts`) and prompt-set loading (:mod:`.data`). Imports nothing else of refusal_lens.
"""
