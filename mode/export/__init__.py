"""Adapters that leave the framework: `mode-export run_dir=<run> format=peft|merged|hub out=<folder>`.

- `peft`: the run's adapter as a PEFT LoRA folder (PeftModel.from_pretrained, vLLM's LoRA loader); MoRE
  (and task-routed mixtures, adapter.router_input=task) one task at a time, `task=<index or name>`.
- `merged`: the adapter folded into the base weights, saved as a transformers model folder (weights,
  config, tokenizer) for AutoModelForCausalLM.
- `hub`: a folder ready to upload (adapter, merged or mode-format weights + a model card README.md);
  `push=true repo_id=<user/name>` uploads it with huggingface_hub.

Layer: beside `mode.report` (reads finished runs; imports models, adapters, run, errors; never report,
evaluation or training). The PEFT conversion itself is `mode.adapters.io` (`save_peft_lora`,
`load_peft_lora`); `mode-eval adapter_path=...` is the import side. docs/sharing.md has the commands.
"""

from mode.export.card import model_card  # noqa: F401
from mode.export.formats import (  # noqa: F401
    FORMATS,
    RunInfo,
    export_run,
    load_run_model,
    read_run,
    resolve_task,
    strip_adapters,
)
from mode.export.hub import push_folder  # noqa: F401
