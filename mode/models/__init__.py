"""Base models and tokenizers: hub ids, local folders, a PyPI-shipped GGUF (the CPU default) or a random
tiny Llama for tests; parameter counts of a base. May import `mode.adapters` (to tell adapter parameters
from base ones), `mode.run` and `mode.errors`.
"""

from mode.models.loading import (  # noqa: F401
    DTYPES,
    byte_tokenizer,
    load_model_and_tokenizer,
    non_embedding_parameters,
    resolve_model_path,
    torch_dtype,
)
