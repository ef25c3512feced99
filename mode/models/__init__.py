"""Base models and tokenizers: hub ids, local folders, a PyPI-shipped GGUF (the CPU default) or a random
tiny Llama or T5 for tests; decoder-only or encoder-decoder (`is_seq2seq`); parameter counts of a base. May import `mode.adapters` (to tell adapter parameters
from base ones), `mode.run` and `mode.errors`.
"""

from mode.models.loading import (  # noqa: F401
    DTYPES,
    byt5_tokenizer,
    byte_tokenizer,
    is_seq2seq,
    load_model_and_tokenizer,
    model_class,
    non_embedding_parameters,
    resolve_model_path,
    torch_dtype,
)
