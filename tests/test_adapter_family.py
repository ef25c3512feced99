"""The adapter family against its formulas: fused forwards vs literal SPEC.md loops, the exact identities
(MoDE 1xrxr = LoRA, MoDE mxrxr = MoLoRA-SD), PEFT's LoRA, merging, save/load, parameter counts, MoRE's
task routing and straight-through selector, routing diagnostics."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    P,
    Q,
    Tiny,
    adapted,
    cfg,
    check_merge_round_trip,
    check_one_task_merged,
    check_save_load_round_trip,
    check_task_id_refusals,
    count_addmm,
)

from mode.adapters import (
    adapter_context,
    adapter_state_dict,
    apply_adapters,
    count_adapter_parameters,
    load_adapters,
    merge_adapters,
    save_adapters,
)
from mode.adapters.diagnostics import AdapterDiagnostics
from mode.errors import ModeError


def more_rank(selector, task: int) -> int:
    """MoRE's rank rule from the raw tensors: k_t = argmax over k of softmax(W e_t + b), counted from 1."""
    p = torch.softmax(selector.weight @ selector.task_embedding[task] + selector.bias, dim=0)
    return int(torch.argmax(p)) + 1


def literal_delta(layer, x, task_ids=None, *, scale):
    """SPEC.md's formula for one layer, token by token, expert by expert, slot by slot (slow, obvious).
    `scale` (alpha / rank) comes from the test's config, never from the layer under test."""
    method, s = layer.method, scale
    A, B = layer.lora_A, layer.lora_B
    out = torch.zeros(*x.shape[:-1], layer.out_features)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            v = x[b, t]
            if method == "lora":
                y = B @ (A @ v)
            elif method == "molora":
                g = torch.softmax(layer.router @ v, dim=0)
                y = sum(g[i] * (B[i] @ (A[i] @ v)) for i in range(B.shape[0]))
            elif method == "molora_sd":
                g = torch.softmax(layer.router @ v, dim=0)
                y = sum(g[i] * (B[i] @ (A @ v)) for i in range(B.shape[0]))
            elif method == "mode":
                h, p = A @ v, layer.block_rank
                y = torch.zeros(layer.out_features)
                for j in range(A.shape[0]):
                    G = torch.softmax(layer.router[j // p] @ v, dim=0)
                    y = y + h[j] * sum(G[i] * B[i][:, j] for i in range(B.shape[0]))
            elif method == "more":
                k = more_rank(layer.selector, int(task_ids[b]))
                y = B[:, :k] @ (A[:k] @ v)
            out[b, t] = s * y
    return out


CASES = [("lora", {}), ("molora", {}), ("molora_sd", {}), ("mode", {}), ("mode", {"block_rank": 2}),
         ("mode", {"block_rank": 4}), ("mode", {"experts": 5, "rank": 6, "block_rank": 3}), ("more", {})]


@pytest.mark.parametrize("method,kw", CASES)
def test_fused_forward_equals_the_literal_formula(method, kw):
    model = adapted(method, **kw)
    x = torch.randn(2, 3, P)
    task_ids = torch.tensor([2, 0])
    layer = model.q_proj
    with adapter_context(model, task_ids=task_ids):
        fused = layer(x) - layer.base_layer(x)
    c = cfg(method, **kw)
    expected = literal_delta(layer, x, task_ids, scale=c["alpha"] / c["rank"])
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_more_tasks_really_use_different_ranks():
    """Guard for the MoRE case above: with equal ranks for every task it would prove little."""
    model = adapted("more")
    ranks = [more_rank(model.q_proj.selector, t) for t in range(3)]
    assert len(set(ranks)) > 1, ranks
    assert model.q_proj.selector.ranks().tolist() == ranks


def test_more_rank_rule_and_scale_against_hand_computed_values():
    """Selector tensors set by hand: W e_t + b = [0,0,5,2], [5,0,0,2], [1,0,0,2] for tasks 0, 1, 2, so
    k = 3, 1, 4 (1-based argmax; the bias decides task 2: without it k would be 1). Scale alpha/R = 8/4 = 2."""
    model = adapted("more")
    layer = model.q_proj
    with torch.no_grad():
        sel = layer.selector
        sel.task_embedding.zero_()
        sel.weight.zero_()
        for t in range(3):
            sel.task_embedding[t, t] = 1.0               # e_t = the t-th unit vector of the input space
        sel.weight[2, 0], sel.weight[0, 1], sel.weight[0, 2] = 5.0, 5.0, 1.0
        sel.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))
    assert [more_rank(sel, t) for t in range(3)] == [3, 1, 4]
    assert sel.ranks().tolist() == [3, 1, 4]
    x = torch.randn(3, 2, P)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    with adapter_context(model, task_ids=torch.tensor([0, 1, 2])), torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
    for t, k in enumerate([3, 1, 4]):
        torch.testing.assert_close(delta[t], 2.0 * x[t] @ (B[:, :k] @ A[:k]).T, rtol=1e-5, atol=1e-5)


def copy_tensors(src, dst, mapping):
    with torch.no_grad():
        for layer in ("q_proj", "o_proj"):
            for name, fn in mapping.items():
                getattr(getattr(dst, layer), name).copy_(fn(getattr(getattr(src, layer), name)))


def assert_same_outputs_and_gradients(a, b, names_a, names_b):
    torch.manual_seed(1)
    x = torch.randn(2, 5, P)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-6)
    target = torch.randn_like(ya)
    ((ya - target) ** 2).sum().backward()
    ((yb - target) ** 2).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-6)
    for layer in ("q_proj", "o_proj"):
        for na, nb in zip(names_a, names_b):
            ga = getattr(getattr(a, layer), na).grad
            gb = getattr(getattr(b, layer), nb).grad
            assert ga is not None and ga.abs().sum() > 0
            torch.testing.assert_close(ga.reshape(gb.shape), gb, rtol=0, atol=1e-6)


def test_mode_1xrxr_is_lora_r():
    lora = adapted("lora")
    mode = adapted("mode", experts=1, block_rank=4, seed=5)
    copy_tensors(lora, mode, {"lora_A": lambda A: A, "lora_B": lambda B: B.unsqueeze(0)})
    mode.q_proj.base_layer.load_state_dict(lora.q_proj.base_layer.state_dict())
    mode.o_proj.base_layer.load_state_dict(lora.o_proj.base_layer.state_dict())
    assert_same_outputs_and_gradients(mode, lora, ["lora_A", "lora_B"], ["lora_A", "lora_B"])


def test_mode_mxrxr_is_molora_sd():
    sd = adapted("molora_sd")
    mode = adapted("mode", block_rank=4, seed=5)
    assert mode.q_proj.router.shape == (1, 3, P) and sd.q_proj.router.shape == (3, P)
    copy_tensors(sd, mode, {"lora_A": lambda t: t, "lora_B": lambda t: t, "router": lambda r: r.unsqueeze(0)})
    mode.q_proj.base_layer.load_state_dict(sd.q_proj.base_layer.state_dict())
    mode.o_proj.base_layer.load_state_dict(sd.o_proj.base_layer.state_dict())
    names = ["lora_A", "lora_B", "router"]
    assert_same_outputs_and_gradients(mode, sd, names, names)


def test_lora_equals_peft_lora_on_a_small_llama():
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(config).eval()
    targets = ["q_proj", "v_proj", "down_proj"]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                       lora_dropout=0.0))
    ours = apply_adapters(copy.deepcopy(base), {"method": "lora", "rank": 4, "alpha": 8, "target_modules": targets})
    with torch.no_grad():
        for name, tensor in adapter_state_dict(ours).items():
            path, kind = name.rsplit(".", 1)
            peft_layer = theirs.base_model.model.get_submodule(path)
            peft_layer.lora_B["default"].weight.normal_()
            tensor.copy_(getattr(peft_layer, kind)["default"].weight)
    ids = torch.randint(0, 64, (2, 9))
    expected = theirs(input_ids=ids).logits
    assert not torch.allclose(expected, base(input_ids=ids).logits, atol=1e-3)  # the adapters do something
    torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["molora", "molora_sd", "mode", "more"])
def test_initial_adapter_is_a_no_op(method):
    torch.manual_seed(0)
    plain = Tiny()
    x = torch.randn(2, 4, P)
    expected = plain(x)
    model = apply_adapters(plain, cfg(method))
    with adapter_context(model, task_ids=torch.tensor([0, 1])):
        torch.testing.assert_close(model(x), expected)


# -- parameter counts: PAPERS.md's table --------------------------------------------------------------
def formula(method, P, Q, r, m=1, p=1, tasks=0):
    return {"lora": r * (P + Q), "molora": m * r * (P + Q) + m * P, "molora_sd": r * P + m * r * Q + m * P,
            "mode": r * P + m * r * Q + (m * r // p) * P, "more": r * (P + Q) + tasks * P + r * P + r}[method]


@pytest.mark.parametrize("method,kw", CASES)
def test_parameter_count_equals_the_papers_formula(method, kw):
    model = adapted(method, **kw)
    c = model.adapter_config
    expected = sum(formula(method, p_in, q_out, c.rank, c.experts, c.block_rank, c.num_tasks or 0)
                   for p_in, q_out in ((P, Q), (Q, P)))
    assert count_adapter_parameters(model) == expected


# -- merge ---------------------------------------------------------------------------------------------
def test_more_merges_one_task_at_a_time():
    model = adapted("more")
    x = torch.randn(2, 4, P)
    check_merge_round_trip(model, x)
    with pytest.raises(ModeError, match="one task at a time"):
        merge_adapters(model)
    check_one_task_merged(model, x)


@pytest.mark.parametrize("method", ["molora", "molora_sd", "mode"])
def test_token_routed_methods_refuse_to_merge_and_change_nothing(method):
    model = adapted(method)
    weight = model.q_proj.base_layer.weight.clone()
    with pytest.raises(ModeError, match="cannot be merged"):
        merge_adapters(model)
    assert torch.equal(model.q_proj.base_layer.weight, weight) and not model.q_proj.merged


# -- save / load -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw", CASES)
def test_save_load_round_trip_reproduces_outputs_exactly(tmp_path, method, kw):
    check_save_load_round_trip(adapted(method, **kw), cfg(method, **kw), tmp_path, torch.randn(2, 3, P), [0, 2])


@pytest.mark.parametrize("saved,loaded,match", [
    (cfg("mode"), cfg("molora_sd"), r"method is 'mode' but the model has 'molora_sd' \(tensor 'q_proj\.router' has shape"),
    (cfg("molora"), cfg("molora_sd"), r"tensor 'q_proj\.lora_A' has shape \[3, 4, 12\], the model expects \[4, 12\]"),
    (cfg("mode"), cfg("mode", experts=2), r"tensor 'q_proj\.lora_B' has shape \[3, 10, 4\], the model expects \[2, 10, 4\]"),
    (cfg("mode", block_rank=2), cfg("mode"), r"tensor 'q_proj\.router' has shape \[2, 3, 12\]"),
    (cfg("more"), cfg("more", num_tasks=5), r"tensor 'q_proj\.selector\.task_embedding' has shape \[3, 12\]"),
    (cfg("lora"), cfg("more"), r"method is 'lora' but the model has 'more' \(missing tensor '[qo]_proj\.selector"),
])
def test_load_into_a_mismatched_adapter_names_the_tensor(tmp_path, saved, loaded, match):
    save_adapters(apply_adapters(Tiny(), saved), tmp_path)
    target = apply_adapters(Tiny(), loaded)
    before = {k: v.clone() for k, v in adapter_state_dict(target).items()}
    with pytest.raises(ModeError, match=match):
        load_adapters(target, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in adapter_state_dict(target).items())  # nothing half-loaded


# -- configuration errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("config,match", [
    (cfg("lora", experts=4), "adapter.experts=4 has no meaning for adapter.method='lora'"),
    (cfg("molora", block_rank=2), "adapter.block_rank=2 is for adapter.method='mode' only"),
    (cfg("molora_sd", block_rank=2), "adapter.block_rank=2 is for adapter.method='mode' only"),
    (cfg("mode", block_rank=3), "adapter.block_rank=3 must divide adapter.rank=4"),
    (cfg("more", num_tasks=None), "adapter.num_tasks=None: adapter.method='more' needs the number of tasks"),
    (cfg("more", contrastive_temperature=0), "adapter.contrastive_temperature=0 must be > 0"),
])
def test_meaningless_or_missing_keys_are_clear_errors(config, match):
    with pytest.raises(ModeError, match=match):
        apply_adapters(Tiny(), config)


def test_more_needs_valid_task_ids():
    model = adapted("more")
    x = torch.randn(2, 3, P)
    with pytest.raises(ModeError, match="adapter_context"):
        model(x)
    check_task_id_refusals(model)
    with pytest.raises(ModeError, match="data has 4 tasks"):
        apply_adapters(Tiny(), cfg("more"), num_tasks=4)


# -- mixed precision -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw", [("molora", {}), ("mode", {"block_rank": 2})])
def test_router_runs_in_float32_under_autocast_and_a_bf16_base(method, kw):
    torch.manual_seed(0)
    model = apply_adapters(Tiny().to(torch.bfloat16), cfg(method, **kw))
    layer = model.q_proj
    with torch.no_grad():
        layer.router.normal_()
    assert layer.router.dtype == layer.lora_A.dtype == torch.float32
    x = torch.randn(6, P, dtype=torch.bfloat16)
    blocks = layer.router.numel() // (3 * P)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gates = layer.gates(x, layer.router, blocks=blocks)
        out = model(x)
    assert gates.dtype == torch.float32 and out.dtype == torch.bfloat16
    reference = (x.float() @ layer.router.reshape(-1, P).T).view(6, blocks, 3).softmax(-1)
    torch.testing.assert_close(gates, reference, rtol=1e-6, atol=1e-6)  # bf16 logits would miss by ~1e-2


METHODS_AND_SHAPES = [("lora", {}), ("molora", {}), ("molora_sd", {}), ("mode", {"block_rank": 2}), ("more", {})]


@pytest.mark.parametrize("method,kw", METHODS_AND_SHAPES)
@pytest.mark.parametrize("setting", ["autocast", "bf16_base"])
def test_bf16_keeps_the_fused_addmm_and_stays_within_bf16_tolerance_of_fp32(method, kw, setting, monkeypatch):
    """Under bf16 autocast (train.precision=bf16) and with a bf16 base without autocast (generation), every
    method adds its delta inside one addmm with a bf16 z (float32 gates / masks would promote z and send
    the layer down a slower unfused path), and the output stays within bf16's tolerance of float32."""
    model = adapted(method, **kw)
    x = torch.randn(2, 5, P)
    ids = torch.tensor([0, 2])
    with adapter_context(model, task_ids=ids):
        reference = model(x)
    if setting == "bf16_base":
        model.q_proj.base_layer.to(torch.bfloat16)
        model.o_proj.base_layer.to(torch.bfloat16)
    calls = count_addmm(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "autocast"), adapter_context(model, task_ids=ids):
        out = model(x.to(torch.bfloat16) if setting == "bf16_base" else x)
    assert calls == [(torch.bfloat16, torch.bfloat16)] * 2  # one fused GEMM per adapted layer, all in bf16
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=3e-2, atol=3e-2 * reference.abs().max().item())


# -- MoRE's straight-through selector ------------------------------------------------------------------
def test_more_selector_trains_straight_through_toward_the_rank_the_task_needs():
    """Start every task at rank 1 while the target needs all 4 ranks: only the selector trains, and only
    the straight-through gradient can move it (the hard choice itself has no gradient)."""
    torch.manual_seed(0)
    model = apply_adapters(Tiny(), cfg("more", num_tasks=2, target_modules=["q_proj"])).eval()
    layer = model.q_proj
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
        layer.selector.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    assert layer.selector.ranks().tolist() == [1, 1]
    x = torch.randn(4, 6, P)
    ids = torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        target = layer.base_layer(x) + layer.scale * x @ layer.lora_A.T @ layer.lora_B.T  # rank 4
    optimizer = torch.optim.Adam(layer.selector.parameters(), lr=0.05)
    for _ in range(60):
        with adapter_context(model, task_ids=ids):
            loss = ((layer(x) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert layer.selector.ranks().tolist() == [4, 4]


# -- routing diagnostics -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw", [("molora", {}), ("mode", {"block_rank": 2})])
def test_routing_statistics_cover_real_tokens_only(method, kw):
    model = adapted(method, **kw)
    x = torch.randn(2, 4, P)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    diagnostics = AdapterDiagnostics(model)
    diagnostics.start()
    with adapter_context(model, attention_mask=mask):
        model(x)
    padded = diagnostics.summary()
    diagnostics.reset()
    model(x[mask.bool()].unsqueeze(0))  # the 5 real tokens alone
    alone = diagnostics.summary()
    for path in ("q_proj", "o_proj"):
        a, b = padded["routed_layers"][path], alone["routed_layers"][path]
        assert a["tokens"] == b["tokens"] == 5
        torch.testing.assert_close(torch.tensor(a["usage"]), torch.tensor(b["usage"]), rtol=0, atol=2e-6)
        assert a["entropy"] == pytest.approx(b["entropy"], abs=2e-6)
        usage = torch.tensor(a["usage"])
        assert torch.allclose(usage.sum(-1), torch.ones(usage.shape[0]), atol=1e-5)
        assert 0 < a["normalized_entropy"] <= 1 and 1 / 3 <= a["max_usage"] <= 1
    scalars = diagnostics.scalars()
    assert scalars["routing/normalized_entropy"] == alone["mean_normalized_entropy"]
    assert "routing/max_usage/q_proj" in scalars
    assert diagnostics.summary()["routed_layers"]["q_proj"]["tokens"] == 0  # scalars() started a new window


@pytest.mark.parametrize("method,kw", [("molora", {}), ("mode", {"block_rank": 2})])
def test_per_task_routing_usage_is_the_mean_gate_over_that_tasks_real_tokens(method, kw):
    """routing.json's task_usage (what the case study's specialisation analysis reads), against gates
    computed by hand for each sequence's real tokens."""
    model = adapted(method, **kw)
    x = torch.randn(3, 4, P)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    ids = torch.tensor([2, 0, 2])
    diagnostics = AdapterDiagnostics(model)
    diagnostics.start(tasks=4)
    with adapter_context(model, task_ids=ids, attention_mask=mask):
        model(x)
    usage = diagnostics.summary(tasks=["a", "b", "c", "d"])["routed_layers"]["q_proj"]["task_usage"]
    assert set(usage) == {"a", "c"}  # tasks without tokens are left out
    layer = model.q_proj
    blocks = layer.router.numel() // (3 * P)
    gates = (x @ layer.router.reshape(-1, P).T).view(3, 4, blocks, 3).softmax(-1)  # [B, S, blocks, m]
    for name, rows in (("a", [1]), ("c", [0, 2])):
        real = torch.cat([gates[b][mask[b].bool()] for b in rows])
        torch.testing.assert_close(torch.tensor(usage[name]), real.mean(0), rtol=0, atol=1e-4)


def test_more_diagnostics_report_each_tasks_rank_and_the_contrastive_loss():
    model = adapted("more")
    diagnostics = AdapterDiagnostics(model)
    diagnostics.start()
    model.train()
    with adapter_context(model, task_ids=torch.tensor([0, 1])) as runtime:
        model(torch.randn(2, 3, P))
        aux = runtime.aux_loss()
    summary = diagnostics.summary(tasks=["a", "b", "c"])
    assert summary["task_ranks"]["q_proj"] == dict(zip("abc", model.q_proj.selector.ranks().tolist()))
    scalars = diagnostics.scalars()
    assert scalars["train/contrastive_loss"] == pytest.approx(aux.item() / 0.1)
    assert runtime.aux == {}  # the context restored the runtime


# -- silent wrong results that are now refused ---------------------------------------------------------------
def test_an_adapter_saved_with_another_scale_is_refused_naming_alpha(tmp_path):
    torch.manual_seed(0)
    base = Tiny()
    save_adapters(apply_adapters(copy.deepcopy(base), cfg("mode", alpha=8)), tmp_path)
    target = apply_adapters(copy.deepcopy(base), cfg("mode", alpha=16))  # same shapes, twice the scale
    with pytest.raises(ModeError, match=r"adapter_config.json: adapter.alpha=8, but the model's adapters have "
                                        r"adapter.alpha=16"):
        load_adapters(target, tmp_path)
    load_adapters(apply_adapters(copy.deepcopy(base), cfg("mode", alpha=8)), tmp_path)  # the same one loads


def test_an_adapter_loaded_into_another_base_of_the_same_shapes_is_refused(tmp_path):
    torch.manual_seed(0)
    trained_on = Tiny()
    save_adapters(apply_adapters(copy.deepcopy(trained_on), cfg("lora")), tmp_path)
    torch.manual_seed(1)
    with pytest.raises(ModeError, match="trained on another base model"):
        load_adapters(apply_adapters(Tiny(), cfg("lora")), tmp_path)
    # the same base in bfloat16 is the same base
    load_adapters(apply_adapters(copy.deepcopy(trained_on).to(torch.bfloat16), cfg("lora")), tmp_path)


@pytest.mark.parametrize("config,match", [
    ({**cfg("mode"), "block_rnak": 2}, r"adapter.block_rnak is not an adapter key \(did you mean adapter.block_rank\?\)"),
    ({**cfg("lora"), "zzz": 1}, r"adapter.zzz is not an adapter key; the keys are method, rank"),
    ({**cfg("lora"), "extra": {"experts_k": 2}}, r"adapter.extra.experts_k is not an adapter key"),
])
def test_unknown_adapter_keys_are_refused_naming_the_key(config, match):
    with pytest.raises(ModeError, match=match):
        apply_adapters(Tiny(), config)


def test_an_empty_legacy_extra_is_accepted():
    for extra in ({}, None):
        apply_adapters(Tiny(), {**cfg("lora"), "extra": extra})
