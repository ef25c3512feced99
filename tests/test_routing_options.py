"""The mixtures' routing options (adapter.top_k, router_temperature, balance_loss_weight, z_loss_weight,
router_input) against their formulas: top_k = m is the dense softmax bit for bit, top-k equals a literal
per-token loop, the auxiliary losses equal their formulas on hand-made logits (padding excluded) and reach
the objective as L + w * aux, task-routed gates depend on the task alone and merge per task, save/load,
a few training steps, and the one-line errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import STORIES, needs_stories
from helpers import (
    P,
    Q,
    Tiny,
    adapted,
    answer_loss,
    cfg,
    check_merge_round_trip,
    check_one_task_merged,
    check_save_load_round_trip,
    check_task_id_refusals,
    count_addmm,
    fit,
    stories_with,
)

from mode import adapters
from mode.adapters.base import router_losses
from mode.adapters.diagnostics import AdapterDiagnostics
from mode.adapters.runtime import runtime_of
from mode.errors import ModeError

MIXTURES = [("molora", {}), ("molora_sd", {}), ("mode", {}), ("mode", {"block_rank": 2}),
            ("mode", {"experts": 5, "rank": 6, "block_rank": 3})]
IDS = [f"{m}{''.join(f'-{k}{v}' for k, v in kw.items())}" for m, kw in MIXTURES]


def experts_of(kw):
    return kw.get("experts", 3)


def literal_delta(layer, x, task_ids=None):
    """The formula token by token, expert by expert, slot by slot, routing included: logits = router @ v / T
    (v = the token, or the sequence's task embedding), keep the top_k logits of each router, softmax over
    the kept ones, 0 elsewhere."""
    A, B, m = layer.lora_A, layer.lora_B, layer.experts
    T, k = layer.router_temperature, layer.top_k or m
    router = layer.router.reshape(-1, m, layer.in_features)          # [blocks, m, P]
    p = layer.rank // router.shape[0]                                  # slots per router

    def gate(block, v):
        logits = (router[block] @ v / T).detach()
        kept = sorted(range(m), key=lambda i: -logits[i].item())[:k]
        g = torch.zeros(m)
        g[kept] = torch.softmax(logits[kept], dim=0)
        return g

    out = torch.zeros(*x.shape[:-1], layer.out_features)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            v = x[b, t]
            r_in = layer.task_embedding[task_ids[b]] if layer.task_routed else v
            if layer.method == "molora":
                g = gate(0, r_in)
                y = sum(g[i] * (B[i] @ (A[i] @ v)) for i in range(m))
            else:  # molora_sd (one block of r slots) and mode
                h = A @ v
                y = torch.zeros(layer.out_features)
                for j in range(A.shape[0]):
                    G = gate(j // p, r_in)
                    y = y + h[j] * sum(G[i] * B[i][:, j] for i in range(m))
            out[b, t] = layer.scale * y
    return out


def grads_and_output(model, x, ids=None, mask=None):
    x = x.clone().requires_grad_()
    with adapters.adapter_context(model, task_ids=ids, attention_mask=mask) as runtime:
        y = model(x)
        aux = runtime.aux_loss()
    loss = ((y - 1.0) ** 2).sum() + (aux if aux is not None else 0.0)
    loss.backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# -- top-k ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw", MIXTURES, ids=IDS)
@pytest.mark.parametrize("extra", [{}, {"balance_loss_weight": 0.3, "z_loss_weight": 0.05, "router_temperature": 0.7},
                                   {"router_input": "task", "num_tasks": 3}], ids=["plain", "aux+temp", "task"])
def test_top_k_equal_to_m_is_the_dense_softmax_bit_for_bit(method, kw, extra):
    """The top-k path (topk, scatter, masked_fill) with nothing to drop changes no bit of outputs or gradients."""
    x = torch.randn(2, 5, P)
    ids = torch.tensor([2, 0])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    dense = adapted(method, **kw, **extra).train()
    topk = adapted(method, **kw, **extra, top_k=experts_of(kw)).train()
    assert topk.q_proj.top_k == experts_of(kw) and dense.q_proj.top_k is None
    yd, xd, gd = grads_and_output(dense, x, ids, mask)
    yk, xk, gk = grads_and_output(topk, x, ids, mask)
    assert torch.equal(yd, yk) and torch.equal(xd, xk)
    assert gd.keys() == gk.keys()
    for name in gd:
        assert gd[name] is not None and gd[name].abs().sum() > 0, name
        assert torch.equal(gd[name], gk[name]), name


@pytest.mark.parametrize("method,kw", MIXTURES, ids=IDS)
@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (2, 1.0), (2, 0.5)])
def test_top_k_equals_a_literal_per_token_implementation(method, kw, top_k, temperature):
    model = adapted(method, **kw, top_k=top_k, router_temperature=temperature)
    layer = model.q_proj
    x = torch.randn(2, 3, P)
    fused = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(fused, literal_delta(layer, x), rtol=1e-5, atol=1e-5)
    gates = layer.gates(x.reshape(-1, P), layer.router, layer.router.numel() // (layer.experts * P))
    assert ((gates > 0).sum(-1) == top_k).all()                  # exactly k experts per router and token
    torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[:-1]))  # renormalised over the kept k


def test_top_k_one_still_trains_the_router_through_the_balance_loss():
    """With top_k=1 the kept gate is the constant 1: only the balance loss (dense probabilities) moves the
    router, and it does. Guards the choice of P in router_losses."""
    model = adapted("molora", top_k=1, balance_loss_weight=1.0).train()
    _, _, grads = grads_and_output(model, torch.randn(2, 5, P))
    assert grads["q_proj.router"].abs().sum() > 0


# -- temperature -----------------------------------------------------------------------------------------------
def test_router_temperature_divides_the_logits():
    model = adapted("mode", block_rank=2, router_temperature=0.25)
    layer = model.q_proj
    x = torch.randn(7, P)
    gates = layer.gates(x, layer.router, blocks=2)
    expected = ((x @ layer.router.reshape(-1, P).T) / 0.25).view(7, 2, 3).softmax(-1)
    torch.testing.assert_close(gates, expected, rtol=1e-6, atol=1e-7)


# -- auxiliary losses ---------------------------------------------------------------------------------------------
def sigmoid(v):
    return 1 / (1 + math.exp(-v))


def test_aux_losses_equal_their_formulas_on_hand_made_logits_with_padding():
    """Two routers (blocks) of m=2 experts over 3 real tokens and 1 padded token with extreme logits.
    Block 0: top-1 picks e0, e1, e0 -> f = (2/3, 1/3); P = ((1 + s(1)) / 3, (2 - s(1)) / 3) since
    softmax(2, 0) and softmax(0, 2) sum to (1, 1); balance = 2 * (2/3 P0 + 1/3 P1) = 2 (4 + s(1)) / 9.
    Block 1: all logits 0 -> f = (1, 0) (ties: the first), P = (1/2, 1/2), balance = 1, lse = log 2."""
    block0 = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [30.0, -30.0]])
    block1 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [-30.0, 30.0]])
    logits = torch.stack([block0, block1], dim=1)                    # [4 tokens, 2 blocks, 2 experts]
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0])                      # the last token is padding
    balance, z = router_losses(logits, weights)
    balance0, balance1 = 2 * (4 + sigmoid(1)) / 9, 1.0
    z0 = (2 * math.log(1 + math.exp(2)) ** 2 + math.log(1 + math.e) ** 2) / 3
    z1 = math.log(2) ** 2
    assert balance.item() == pytest.approx((balance0 + balance1) / 2, rel=1e-6)
    assert z.item() == pytest.approx((z0 + z1) / 2, rel=1e-6)
    # no mask: every row counts, e.g. the padded one
    balance_all, z_all = router_losses(logits[:3], None)
    assert (balance_all.item(), z_all.item()) == pytest.approx((balance.item(), z.item()), rel=1e-6)
    # a balanced router gives 1, a collapsed one m
    assert router_losses(torch.tensor([[[5.0, 0.0]], [[0.0, 5.0]]]), None)[0].item() == pytest.approx(1.0)
    collapsed = router_losses(torch.tensor([[[50.0, 0.0, 0.0]]] * 4), None)[0]
    assert collapsed.item() == pytest.approx(3.0)


@pytest.mark.parametrize("method,kw", [("molora", {}), ("mode", {"block_rank": 2}),
                                       ("mode", {"router_input": "task", "num_tasks": 3, "top_k": 2})])
def test_layer_aux_losses_are_the_formula_over_real_tokens_and_reach_the_objective(method, kw):
    model = adapted(method, **kw, balance_loss_weight=0.2, z_loss_weight=0.01, router_temperature=2.0).train()
    x = torch.randn(2, 4, P)
    ids = torch.tensor([1, 2])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    with adapters.adapter_context(model, task_ids=ids, attention_mask=mask) as runtime:
        model(x)
        aux = dict(runtime.aux)
        objective = runtime.aux_loss()
    layer = model.q_proj
    blocks = layer.router.numel() // (3 * P)
    if layer.task_routed:  # every real token of sequence b carries its task's logits
        route = layer.task_embedding[ids].repeat_interleave(4, dim=0)
    else:
        route = x.reshape(-1, P)
    real = mask.reshape(-1).bool()
    logits = (route[real] @ layer.router.reshape(-1, P).T / 2.0).view(-1, blocks, 3)  # real tokens only
    balance, z = router_losses(logits, None)
    assert len(aux["balance"]) == len(aux["z"]) == 2                  # one value per adapted layer
    torch.testing.assert_close(aux["balance"][0], balance, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(aux["z"][0], z, rtol=1e-6, atol=1e-7)
    expected = 0.2 * torch.stack(aux["balance"]).mean() + 0.01 * torch.stack(aux["z"]).mean()
    torch.testing.assert_close(objective, expected)
    assert runtime.aux_history["balance"][-1] == pytest.approx(torch.stack(aux["balance"]).mean().item())
    # evaluation (no gradient, eval mode) records none
    model.eval()
    with torch.no_grad(), adapters.adapter_context(model, task_ids=ids, attention_mask=mask) as runtime:
        model(x)
        assert runtime.aux == {}


def test_aux_losses_are_logged_separately():
    model = adapted("mode", balance_loss_weight=0.1, z_loss_weight=0.001).train()
    diagnostics = AdapterDiagnostics(model)
    diagnostics.start()
    values = []
    for _ in range(2):
        with adapters.adapter_context(model) as runtime:
            model(torch.randn(2, 3, P))
            runtime.aux_loss()
            values.append({k: torch.stack(v).mean().item() for k, v in runtime.aux.items()})
    scalars = diagnostics.scalars()
    assert scalars["train/balance_loss"] == pytest.approx(sum(v["balance"] for v in values) / 2)
    assert scalars["train/z_loss"] == pytest.approx(sum(v["z"] for v in values) / 2)
    assert "routing/max_usage" in scalars


@pytest.mark.parametrize("name,weight", [("balance", "balance_loss_weight"), ("z", "z_loss_weight")])
def test_each_aux_loss_alone_trains_the_routers_toward_its_minimum(name, weight):
    """Routers start collapsed (large logits toward expert 0); optimising only the aux loss balances them
    (balance -> 1) or shrinks the logits (z-loss)."""
    torch.manual_seed(0)
    model = adapters.apply_adapters(Tiny(), cfg("molora", **{weight: 1.0})).train()
    routers = [model.q_proj.router, model.o_proj.router]
    with torch.no_grad():
        for r in routers:
            r.normal_(std=0.3)
            r[0] += 1.0
    x = torch.randn(4, 8, P).abs()
    optimizer = torch.optim.Adam(routers, lr=0.05)
    history = []
    for _ in range(40):
        with adapters.adapter_context(model) as runtime:
            model(x)
            loss = runtime.aux_loss()
        history.append(runtime.aux_history[name][-1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert history[-1] < 0.7 * history[0], history[::8]
    if name == "balance":
        assert history[-1] < 1.2


# -- task-level routing ------------------------------------------------------------------------------------------
TASK = {"router_input": "task", "num_tasks": 3}


@pytest.mark.parametrize("method,kw", MIXTURES, ids=IDS)
@pytest.mark.parametrize("extra", [{}, {"top_k": 2, "router_temperature": 0.5}], ids=["dense", "top2"])
def test_task_routed_forward_equals_the_literal_formula_with_one_gate_per_sequence(method, kw, extra):
    model = adapted(method, **kw, **TASK, **extra)
    layer = model.q_proj
    assert layer.task_routed and not layer.token_routed
    x = torch.randn(3, 4, P)
    ids = torch.tensor([2, 0, 2])
    with adapters.adapter_context(model, task_ids=ids):
        fused = layer(x) - layer.base_layer(x)
        gates = layer.mixture_gates(x, x, layer.router, layer.router.numel() // (layer.experts * P))
        other = layer.mixture_gates(torch.randn(3, 4, P), None, layer.router,
                                    layer.router.numel() // (layer.experts * P))
    torch.testing.assert_close(fused, literal_delta(layer, x, ids), rtol=1e-5, atol=1e-5)
    assert gates.shape[:2] == (3, 1)                  # one gate vector per sequence, broadcast over its tokens
    assert torch.equal(gates, other)                  # the tokens do not matter
    assert torch.equal(gates[0], gates[2])            # the same task, the same gates


@pytest.mark.parametrize("method,kw", MIXTURES, ids=IDS)
@pytest.mark.parametrize("extra", [{}, {"top_k": 2}], ids=["dense", "top2"])
def test_task_routed_mixture_merges_per_task_and_reproduces_outputs(method, kw, extra):
    model = adapted(method, **kw, **TASK, **extra)
    layer = model.q_proj
    up, down = layer.lora_factors(1)
    m, r = layer.experts, layer.rank
    assert up.shape == (Q, m * r if method == "molora" else r) and down.shape[0] == up.shape[1]
    x = torch.randn(2, 4, P)
    check_merge_round_trip(model, x)
    with pytest.raises(ModeError, match="router_input='task' holds one adapter per task"):
        adapters.merge_adapters(model)
    with pytest.raises(ModeError, match=r"task=3 is not a task index of this adapter \(0..2\)"):
        adapters.merge_adapters(model, task=3)
    assert not layer.merged
    check_one_task_merged(model, x)


def test_task_routing_adds_one_embedding_per_task_and_layer():
    for method in ("molora", "molora_sd", "mode"):
        token = adapters.count_adapter_parameters(adapted(method))
        task = adapters.count_adapter_parameters(adapted(method, **TASK))
        assert task - token == 3 * (P + Q)  # [num_tasks, P] per adapted layer (q_proj: P, o_proj: Q inputs)


def test_task_routed_usage_per_task_is_its_gates():
    model = adapted("mode", block_rank=2, **TASK)
    x = torch.randn(3, 4, P)
    ids = torch.tensor([2, 0, 2])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    diagnostics = AdapterDiagnostics(model)
    diagnostics.start(tasks=3)
    with adapters.adapter_context(model, task_ids=ids, attention_mask=mask):
        model(x)
    record = diagnostics.summary(tasks=["a", "b", "c"])["routed_layers"]["q_proj"]
    assert record["tokens"] == 9
    layer = model.q_proj
    for name, task in (("a", 0), ("c", 2)):
        expected = (layer.task_embedding[task] @ layer.router.reshape(-1, P).T).view(2, 3).softmax(-1)
        torch.testing.assert_close(torch.tensor(record["task_usage"][name]), expected, rtol=0, atol=1e-4)


# -- save / load ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw", [("molora", {**TASK, "top_k": 2}), ("molora_sd", TASK),
                                       ("mode", {**TASK, "block_rank": 2, "router_temperature": 0.5}),
                                       ("mode", {"top_k": 1, "balance_loss_weight": 0.1, "z_loss_weight": 0.01})])
def test_save_load_round_trip_with_routing_options(tmp_path, method, kw):
    model = adapted(method, **kw)
    state = adapters.adapter_state_dict(model)
    if kw.get("router_input") == "task":
        assert state["q_proj.task_embedding"].shape == (3, P) and state["o_proj.task_embedding"].shape == (3, Q)
    else:
        assert not any("task_embedding" in k for k in state)
    check_save_load_round_trip(model, cfg(method, **kw), tmp_path, torch.randn(2, 3, P), [0, 2])


def test_loading_a_token_routed_adapter_into_a_task_routed_one_names_the_tensor(tmp_path):
    adapters.save_adapters(adapted("mode"), tmp_path)
    with pytest.raises(ModeError, match=r"missing tensor '[qo]_proj\.task_embedding'"):
        adapters.load_adapters(adapted("mode", **TASK), tmp_path)


# -- bf16 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{"top_k": 2}, TASK, {**TASK, "top_k": 1, "router_temperature": 2.0}])
def test_routing_options_keep_the_one_bf16_addmm(kw, monkeypatch):
    model = adapted("mode", block_rank=2, **kw)
    x = torch.randn(2, 5, P)
    ids = torch.tensor([0, 2])
    with adapters.adapter_context(model, task_ids=ids):
        reference = model(x)
    calls = count_addmm(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16), adapters.adapter_context(model, task_ids=ids):
        out = model(x)
    assert calls == [(torch.bfloat16, torch.bfloat16)] * 2
    torch.testing.assert_close(out.float(), reference, rtol=3e-2, atol=3e-2 * reference.abs().max().item())


# -- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,match", [
    (cfg("mode", top_k=0), r"adapter.top_k=0 must be an integer >= 1 \(or null"),
    (cfg("mode", top_k=2.5), r"adapter.top_k=2.5 must be an integer >= 1"),
    (cfg("molora", top_k=4), r"adapter.top_k=4 exceeds adapter.experts=3"),
    (cfg("molora_sd", top_k=4), r"adapter.top_k=4 exceeds adapter.experts=3"),
    (cfg("mode", router_temperature=0), r"adapter.router_temperature=0 must be a number > 0"),
    (cfg("mode", router_temperature=-1.0), r"adapter.router_temperature=-1.0 must be a number > 0"),
    (cfg("mode", balance_loss_weight=-0.1), r"adapter.balance_loss_weight=-0.1 must be a number >= 0"),
    (cfg("molora", z_loss_weight=-1e-3), r"adapter.z_loss_weight=-0.001 must be a number >= 0"),
    (cfg("mode", router_input="sequence"), r"adapter.router_input='sequence' is not one of \['token', 'task'\]"),
    (cfg("lora", router_input="task"), r"adapter.router_input='task' has no meaning for adapter.method='lora'"),
    (cfg("more", router_input="task"), r"adapter.router_input='task' has no meaning for adapter.method='more'"),
    (cfg("lora", top_k=1), r"adapter.top_k=1 has no meaning for adapter.method='lora'.*leave it at null"),
    (cfg("more", balance_loss_weight=0.1), r"adapter.balance_loss_weight=0.1 has no meaning for adapter.method='more'"),
    (cfg("lora", router_temperature=2.0), r"adapter.router_temperature=2.0 has no meaning"),
    (cfg("mode", router_input="task"), r"adapter.num_tasks=None: adapter.router_input='task' needs the number"),
])
def test_bad_routing_options_are_one_line_errors_naming_the_key(config, match):
    with pytest.raises(ModeError, match=match) as err:
        adapters.apply_adapters(Tiny(), config)
    assert "\n" not in str(err.value)


def test_task_routing_needs_valid_task_ids():
    model = adapted("molora", **TASK)
    x = torch.randn(2, 3, P)
    with pytest.raises(ModeError, match="adapter.router_input='task' routes by task id"):
        model(x)
    check_task_id_refusals(model)


def test_token_routed_mixtures_with_routing_options_still_refuse_to_merge():
    model = adapted("mode", top_k=2)
    with pytest.raises(ModeError, match="cannot be merged"):
        adapters.merge_adapters(model, task=0)
    assert not model.q_proj.merged


# -- a few training steps on stories260K ----------------------------------------------------------------------------
OPTIONS = {"top_k": {"top_k": 2}, "router_temperature": {"router_temperature": 0.5},
           "balance_loss_weight": {"balance_loss_weight": 0.01}, "z_loss_weight": {"z_loss_weight": 0.001},
           "router_input": {"router_input": "task"}, "mode_14x4_top2": {"experts": 14, "top_k": 2}}


@needs_stories
@pytest.mark.parametrize("method,option", [("mode", option) for option in OPTIONS]
                         + [("molora", "top_k"), ("molora_sd", "router_input")])
def test_a_few_steps_lower_the_loss_with_each_option(stories_batch, method, option):
    model = stories_with(method, **OPTIONS[option])
    before, after, loss_module = fit(model, stories_batch)
    assert after < 0.5 * before, (before, after)
    history = runtime_of(model).aux_history
    weights = {"balance": OPTIONS[option].get("balance_loss_weight", 0), "z": OPTIONS[option].get("z_loss_weight", 0)}
    assert set(history) == {name for name, w in weights.items() if w}
    if history:  # the objective is L + w * aux: the caller's division by answer tokens leaves exactly that
        train_objective = answer_loss(loss_module.train(), stories_batch).item()  # aux losses are recorded
        with torch.no_grad():
            generation = answer_loss(loss_module.eval(), stories_batch).item()
        aux = sum(weights[name] * values[-1] for name, values in history.items())
        assert train_objective == pytest.approx(generation + aux, rel=1e-5)


@needs_stories
@pytest.mark.parametrize("router_input", ["token", "task"])
def test_gradient_checkpointing_records_the_aux_losses_once_and_changes_no_gradient(stories_batch, router_input):
    from transformers import AutoModelForCausalLM

    from mode.training.losses import AnswerLoss
    from mode.training.throughput import enable_checkpointing

    grads, values = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = adapters.apply_adapters(AutoModelForCausalLM.from_pretrained(STORIES),
                               {"method": "mode", "rank": 4, "alpha": 8, "experts": 4, "block_rank": 2, "top_k": 2,
                                "balance_loss_weight": 0.1, "z_loss_weight": 0.01, "router_input": router_input},
                               num_tasks=3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
        if checkpointing:
            enable_checkpointing(model)
        batch = stories_batch
        loss = AnswerLoss(model).train()(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["task_ids"])
        loss.backward()
        history = runtime_of(model).aux_history
        assert len(history["balance"]) == len(history["z"]) == 1  # the recompute recorded nothing
        values.append((history["balance"][0], history["z"][0]))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
