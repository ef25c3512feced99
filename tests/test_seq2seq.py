"""Encoder-decoder bases (T5) end to end: Tk-Instruct's encoder/decoder inputs on real tasks, every adapter
method through the CLI, exact resume, mode-eval, PEFT's T5 LoRA, decoder-side masks and MoRE's task ids in
both stacks."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from conftest import REPO, SHARED_SNI, needs_shared_sni, needs_stories, write_sni_fixture
from tiny_runs import adapter_bytes, run_with_fault

from mode.adapters import adapter_context, apply_adapters
from mode.adapters.inject import adapter_layers
from mode.data.collate import IGNORE_INDEX, collate_prompts, collate_seq2seq
from mode.data.encoding import EncodingConfig, PromptEncoder
from mode.data.sni import load_task
from mode.models import is_seq2seq, load_model_and_tokenizer
from mode.run.config import compose
from mode.train import train
from mode.training.losses import Seq2SeqAnswerLoss, answer_loss

TASKS = "data.tasks=[task001_add_numbers,task002_echo_word]"
T5 = ["model=t5_tiny_random", TASKS, "data.max_instances_per_task=12", "data.encoding.max_source_length=160",
      "data.encoding.max_target_length=16", "train.max_steps=4", "train.batch_size=4", "train.micro_batch_size=2",
      "train.log_every=2", "train.save_every=2", "adapter.rank=4", "adapter.dropout=0.1",
      "eval.max_instances_per_task=3", "eval.max_new_tokens=6", "eval.batch_size=8"]
SHAPES = {"lora": [], "molora": ["adapter.experts=2"], "molora_sd": ["adapter.experts=2"],
          "mode": ["adapter.experts=3", "adapter.block_rank=2"], "more": []}


@pytest.fixture(scope="module")
def sni(tmp_path_factory):
    return write_sni_fixture(tmp_path_factory.mktemp("data") / "sni")


def t5_overrides(sni_dir, method="lora", *extra):
    return [f"data.sni_dir={sni_dir}", *T5, f"adapter={method}", *SHAPES[method], *extra]


def t5_model(method="lora", num_tasks=2, **adapter):
    cfg = compose("train", ["model=t5_tiny_random", f"adapter={method}", "adapter.rank=4", *SHAPES[method]])
    model, tok = load_model_and_tokenizer(cfg.model)
    spec = {**dict(cfg.adapter), **adapter}
    apply_adapters(model, spec, num_tasks=num_tasks)
    return model, tok


def cli(module, *args):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


# -- the model and its inputs -----------------------------------------------------------------------------
def test_the_tiny_t5_is_an_encoder_decoder_with_t5s_special_tokens():
    model, tok = t5_model()
    assert is_seq2seq(model) and type(model).__name__ == "T5ForConditionalGeneration"
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1) and model.config.decoder_start_token_id == 0
    layers = dict(adapter_layers(model))
    # q, k, v, o of the encoder's self-attention and of the decoder's self- and cross-attention
    assert len(layers) == 2 * 4 + 2 * 8
    assert {p for p, layer in layers.items() if layer.in_decoder} == {p for p in layers if p.startswith("decoder.")}


@needs_stories
@needs_shared_sni
def test_encoder_and_decoder_inputs_equal_tk_instructs_collator_on_real_tasks():
    """DataCollatorForNI's last step for T5: tokenizer(sources, max_length, truncation) and
    tokenizer(labels, max_target_length, truncation) with -100 on padding; the model shifts labels right."""
    from test_encoding import _real_tasks, t5_style_tokenizer, tk_instruct_source
    from transformers import T5Config, T5ForConditionalGeneration

    tok = t5_style_tokenizer()
    budget, target_budget = 10**5, 64  # sources are never cut here: ours keeps the query, Tk-Instruct's tail cut does not
    enc = PromptEncoder(tok, EncodingConfig(num_pos_examples=2, max_source_length=budget,
                                            max_target_length=target_budget), seq2seq=True)
    count = lambda text: len(tok(text)["input_ids"])  # noqa: E731 - Tk-Instruct's own check
    rows, sources, labels = [], [], []
    for name in _real_tasks(12, seed=3):
        task = load_task(SHARED_SNI, name)
        raw = json.loads((SHARED_SNI / "tasks" / f"{name}.json").read_text()) | {"Task": name}
        for inst in task.instances[:4]:
            prompt, _ = enc.prompt_ids(task, inst["input"])
            answer, _ = enc.answer_ids(inst["output"][0])
            rows.append({"input_ids": prompt + answer, "prompt_length": len(prompt), "task_index": 0})
            sources.append(tk_instruct_source(raw, inst, count, budget, num_pos_examples=2))
            labels.append(inst["output"][0])
    ours = collate_seq2seq(rows, pad_id=tok.pad_token_id)
    theirs = tok(sources, max_length=budget, padding=True, truncation=True, return_tensors="pt")
    label_batch = tok(labels, max_length=target_budget, padding=True, truncation=True, return_tensors="pt")
    their_labels = label_batch["input_ids"].masked_fill(~label_batch["attention_mask"].bool(), IGNORE_INDEX)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert torch.equal(ours["labels"], their_labels) and len(rows) == 48
    config = T5Config(vocab_size=len(tok), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id)
    model = T5ForConditionalGeneration(config)
    decoder_inputs = model.prepare_decoder_input_ids_from_labels(labels=ours["labels"])
    assert decoder_inputs[:, 0].eq(tok.pad_token_id).all()  # T5 starts the decoder from its pad token
    assert torch.equal(decoder_inputs[:, 1:], ours["labels"][:, :-1].masked_fill(ours["labels"][:, :-1] < 0, 0))


def test_seq2seq_loss_is_the_summed_target_cross_entropy_and_hf_labels_path_agrees():
    model, _ = t5_model("mode")
    torch.manual_seed(0)
    for _, layer in adapter_layers(model):  # non-zero up-projections: the adapters change the output
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    ids = torch.randint(3, 250, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    labels = torch.randint(3, 250, (3, 5))
    labels[1, 3:] = IGNORE_INDEX
    loss = answer_loss(model).eval()  # T5's dropout off: both paths must see the same network
    assert isinstance(loss, Seq2SeqAnswerLoss)
    ours = loss(ids, mask, labels)
    hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # mean over target tokens
    torch.testing.assert_close(ours / (labels != IGNORE_INDEX).sum(), hf)


def test_decoder_layers_weigh_target_tokens_and_encoder_layers_source_tokens():
    """With source and target of equal length the sizes cannot tell the masks apart: the layer's stack does."""
    model, _ = t5_model("mode", balance_loss_weight=0.1)
    seen = {}
    for path, layer in adapter_layers(model):
        original = layer.token_weights

        def spy(n, path=path, original=original):
            seen[path] = original(n)
            return seen[path]
        layer.token_weights = spy
    source_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX], [5, 6, 7, 8]])
    Seq2SeqAnswerLoss(model).train()(torch.randint(3, 250, (2, 4)), source_mask, labels)
    encoder = seen["encoder.block.0.layer.0.SelfAttention.q"]
    decoder = seen["decoder.block.0.layer.1.EncDecAttention.q"]
    assert encoder.tolist() == source_mask.reshape(-1).float().tolist()
    assert decoder.tolist() == (labels != IGNORE_INDEX).reshape(-1).float().tolist()


def test_mores_task_ids_reach_encoder_and_decoder_layers():
    model, _ = t5_model("more")
    for _, layer in adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
        torch.nn.init.normal_(layer.selector.task_embedding, std=1.0)
    outputs = {}
    for path in ("encoder.block.1.layer.0.SelfAttention.v", "decoder.block.1.layer.1.EncDecAttention.q"):
        model.get_submodule(path).register_forward_hook(lambda m, i, o, path=path: outputs.setdefault(path, []).append(o))
    ids, labels = torch.randint(3, 250, (1, 6)), torch.randint(3, 250, (1, 3))
    model.eval()
    for task in (0, 1):
        with torch.no_grad(), adapter_context(model, task_ids=torch.tensor([task])):
            model(input_ids=ids, labels=labels)
    ranks = [model.get_submodule(p).selector.ranks().tolist() for p in outputs]
    assert all(r[0] != r[1] for r in ranks), ranks  # the two tasks pick different ranks in both stacks
    for path, (task0, task1) in outputs.items():
        assert not torch.allclose(task0, task1), path


def test_batched_generation_equals_one_at_a_time_and_pads_sources_right():
    model, tok = t5_model("mode")
    for _, layer in adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    from mode.evaluation.generation import generate

    class TokenIds:  # a random model's bytes are rarely valid UTF-8: compare the generated token ids
        pad_token_id, eos_token_id = tok.pad_token_id, tok.eos_token_id

        @staticmethod
        def batch_decode(rows, skip_special_tokens):
            return [" ".join(str(t) for t in row.tolist()) for row in rows]

    prompts = [tok("question number 7?")["input_ids"], tok("2 + 2 =")["input_ids"], tok("a")["input_ids"]]
    assert collate_prompts(prompts, 0, left=False)["attention_mask"][2].tolist()[:3] == [1, 1, 0]
    batched = generate(model, TokenIds, prompts, batch_size=3, max_new_tokens=6, device="cpu", min_new_tokens=6)
    alone = [generate(model, TokenIds, [p], batch_size=1, max_new_tokens=6, device="cpu", min_new_tokens=6)[0]
             for p in prompts]
    assert batched == alone and all(len(text.split()) == 6 for text in batched), batched


# -- end to end ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mode", *(pytest.param(m, marks=pytest.mark.slow)  # default suite: one method
                                              for m in ("lora", "more", "molora", "molora_sd"))])
def test_every_method_trains_a_t5_through_the_cli_and_mode_eval_reproduces(sni, tmp_path, method):
    run = tmp_path / "run"
    cli("mode.train", *t5_overrides(sni, method), f"hydra.run.dir={run}")
    metrics = json.loads((run / "metrics.json").read_text())
    predictions = (run / "predictions.jsonl").read_text().splitlines()
    assert metrics["num_instances"] == len(predictions) == 5 and metrics["train_loss"] > 0  # 3 + 2 held-in
    if method in ("mode", "more"):  # routing statistics (MoDE) and chosen ranks (MoRE) of both stacks
        layers = json.loads((run / "routing.json").read_text())["routed_layers" if method == "mode" else "task_ranks"]
        assert any(p.startswith("encoder.") for p in layers) and any(p.startswith("decoder.") for p in layers)
    out = cli("mode.eval", f"run_dir={run}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert "reproduces the run's metrics exactly" in out.stdout


@pytest.mark.parametrize("method", list(SHAPES))
def test_a_few_steps_on_one_batch_lower_the_t5_loss_for_every_method(method):
    torch.manual_seed(0)
    model, _ = t5_model(method, num_tasks=2)
    loss_module = Seq2SeqAnswerLoss(model).train()
    ids, labels = torch.randint(3, 250, (4, 12)), torch.randint(3, 250, (4, 5))
    tasks = torch.tensor([0, 1, 0, 1])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = loss_module(ids, torch.ones_like(ids), labels, tasks) / labels.numel()
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.9 * losses[0], losses


def test_a_killed_t5_run_resumes_bit_exact(sni, tmp_path):
    reference = tmp_path / "reference"
    train(compose("train", t5_overrides(sni, "mode")), str(reference))
    run = tmp_path / "run"
    proc = run_with_fault("kill-at-step", 3, [*t5_overrides(sni, "mode"), f"hydra.run.dir={run}"])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    train(compose("train", [*t5_overrides(sni, "mode"), "resume=true"]), str(run))
    assert adapter_bytes(run) == adapter_bytes(reference)
    assert (run / "metrics.json").read_bytes() == (reference / "metrics.json").read_bytes()


def test_gradient_checkpointing_gives_the_same_t5_gradients():
    from mode.training.throughput import enable_checkpointing

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same adapter init for both
        model, _ = t5_model("more", contrastive_weight=0.1)
        if checkpointing:
            enable_checkpointing(model)
        torch.manual_seed(0)
        ids, labels = torch.randint(3, 250, (2, 7)), torch.randint(3, 250, (2, 4))
        model.train()
        Seq2SeqAnswerLoss(model)(ids, torch.ones_like(ids), labels, torch.tensor([0, 1])).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# -- sharing --------------------------------------------------------------------------------------------------
def test_a_t5_lora_equals_pefts_t5_lora(tmp_path):
    peft = pytest.importorskip("peft")
    from mode.adapters.io import save_peft_lora

    model, _ = t5_model("lora")
    for _, layer in adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    save_peft_lora(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    base, _ = load_model_and_tokenizer(compose("train", ["model=t5_tiny_random"]).model)
    ids, labels = torch.randint(3, 250, (2, 9)), torch.randint(3, 250, (2, 5))
    with torch.no_grad():
        plain = base.eval()(input_ids=ids, labels=labels).logits
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
        expected = model.eval()(input_ids=ids, labels=labels).logits
        actual = theirs(input_ids=ids, labels=labels).logits
    assert (actual - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())
    assert (plain - expected).abs().max() > 1e-3  # the adapter does something PEFT had to reproduce


def test_mode_params_sizes_flan_t5_base_on_the_meta_device():
    from mode.report.params import parameter_table

    table = parameter_table(compose("train", ["model=flan_t5_base", "adapter=lora", "adapter.rank=8"]))
    # 12 encoder layers x 4 projections + 12 decoder layers x 8 (self- and cross-attention), each r (768 + 768)
    assert table["trainable"] == (12 * 4 + 12 * 8) * 8 * (768 + 768) == 1_769_472


# -- throughput options (slow: real processes, compilation) -----------------------------------------------------
NO_DROPOUT = ["model.random_init.dropout_rate=0.0", "adapter.dropout=0.0"]  # ranks draw other dropout masks


@pytest.mark.slow
def test_a_t5_on_two_processes_trains_like_one(sni, tmp_path):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    args = [*t5_overrides(sni, "mode", *NO_DROPOUT), "train.save_every=100"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mode.train",
                          *args, f"hydra.run.dir={tmp_path / 'two'}"], cwd=REPO, capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    cli("mode.train", *args, f"hydra.run.dir={tmp_path / 'one'}")
    a, b = (load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors")) for run in ("two", "one"))
    assert a.keys() == b.keys()
    for key in a:  # the same micro-batches; only the order of one gradient sum differs (see test_distributed)
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_bf16_checkpointing_and_compile_train_a_t5_close_to_fp32(sni, tmp_path):
    runs = {"fp32": [], "fast": ["train.precision=bf16", "train.gradient_checkpointing=true", "train.compile=true"]}
    losses = {}
    for name, extra in runs.items():
        cli("mode.train", *t5_overrides(sni, "mode", *NO_DROPOUT), "train.max_steps=2", *extra,
            f"hydra.run.dir={tmp_path / name}")
        losses[name] = json.loads((tmp_path / name / "metrics.json").read_text())["train_loss"]
    # bf16 rounds activations to 8 bits of mantissa: the same loss to a few per cent, not bit for bit
    assert abs(losses["fast"] - losses["fp32"]) <= 0.05 * losses["fp32"], losses
