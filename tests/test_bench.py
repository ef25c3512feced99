"""The benchmark (`make bench`): its per-expert-loop reference computes exactly what our fused layers
compute (so the comparison is fair), and its quick mode runs every part and writes the report."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from torch import nn

from benchmarks.loops import apply_loop_adapters
from mode.adapters import adapter_state_dict, apply_adapters


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(12, 10)

    def forward(self, x):
        return self.q_proj(x)


@pytest.mark.parametrize("method,shape", [("molora", {"experts": 5}), ("mode", {"experts": 5, "block_rank": 1}),
                                          ("mode", {"experts": 3, "rank": 6, "block_rank": 3})])
def test_loop_reference_equals_the_fused_layer(method, shape):
    cfg = {"method": method, "rank": 4, "alpha": 8, "target_modules": ["q_proj"], "init_A": "normal", **shape}
    torch.manual_seed(0)
    fused = apply_adapters(Tiny(), cfg)
    torch.manual_seed(0)
    loop = apply_loop_adapters(Tiny(), cfg)
    assert type(loop.q_proj).__name__.startswith("Loop")
    with torch.no_grad():
        for (_, a), (_, b) in zip(sorted(fused.named_parameters()), sorted(loop.named_parameters())):
            a.normal_() if a.requires_grad else None
            b.copy_(a)
    x = torch.randn(2, 7, 12)
    out_f, out_l = fused(x), loop(x)
    torch.testing.assert_close(out_l, out_f, rtol=1e-5, atol=1e-5)
    out_f.square().sum().backward()
    out_l.square().sum().backward()
    grads_f = {n: p.grad for n, p in fused.named_parameters() if p.requires_grad}
    for n, p in loop.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_f[n], rtol=1e-3, atol=1e-4)
    assert adapter_state_dict(loop).keys() == adapter_state_dict(fused).keys()


@pytest.mark.slow  # minutes of subprocesses: CI runs it (make test-all)
def test_quick_benchmark_writes_the_report(tmp_path):
    only = "floor,peft_lora64,lora64,mode16x4x1,loop_mode16x4x1"
    cmd = [sys.executable, "-m", "benchmarks.bench", "--quick", "--model", "tiny_random", "--rounds", "2",
           "--out", str(tmp_path)]
    proc = subprocess.run([*cmd, "--parts", "step,layer,generate,profile", "--only", only], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A second command adds its part to the same report (memory: one fresh process per setup).
    proc = subprocess.run([*cmd, "--parts", "memory", "--only", "lora64"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    step = results["step"]["setups"]
    assert list(step) == only.split(",") and all(len(s["times_s"]) == 2 for s in step.values())
    assert step["lora64"]["trainable_parameters"] == step["peft_lora64"]["trainable_parameters"] > 0
    assert step["floor"]["trainable_parameters"] == 0
    assert list(results["layer"]["setups"]) == only.split(",")
    assert set(results["generate"]["setups"]) == set(only.split(","))
    assert set(results["profile"]["setups"]) == {"lora64", "mode16x4x1", "loop_mode16x4x1"}
    assert any(op.startswith("aten::") for op in results["profile"]["operators"])
    memory = results["memory"]["setups"]
    assert set(memory) == {"lora64"} and memory["lora64"]["peak_mib"] > memory["lora64"]["step_mib"] > 0
    report = (tmp_path / "bench.md").read_text()
    for goal in ("our LoRA r64 step vs PEFT LoRA r64", "MoDE 16x4 step vs LoRA r64",
                 "MoDE 16x4 generation tokens/s vs LoRA r64", "one layer: MoDE 16x4 vs LoRA r64"):
        assert goal in report
    assert re.search(r"\| LoRA r64 \| [\d,]+ \|.* \| \d+ \| \d+ \| 1\.000 \|", report)  # its memory cells
    assert "python -m benchmarks.bench --quick" in report and "## Profile of one training step" in report
    bad = subprocess.run([*cmd[:3], "--only", "lora_99"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "--only 'lora_99' is not one of" in bad.stderr


def test_top_k_and_bf16_variants_are_what_they_say():
    """A top-k setup's routers keep k experts, and a bf16 setup's base matmuls run in bf16 (its fp32 twin's
    in fp32): the variant rows measure the option they are named after."""
    from benchmarks.setups import BY_NAME, LayerStep, OneLayer, build

    for name, k in (("molora16x4_top1", 1), ("mode16x4x1_top2", 2), ("mode16x4x1", None)):
        layer = build(OneLayer(nn.Linear(32, 24)), BY_NAME[name], ["q_proj"]).q_proj
        assert layer.top_k == k and layer.experts == 16, name
    dtypes = {}
    for name in ("mode16x4x1_bf16", "mode16x4x1", "floor_bf16"):
        model = build(OneLayer(nn.Linear(32, 24).requires_grad_(False)), BY_NAME[name], ["q_proj"])
        base = getattr(model.q_proj, "base_layer", model.q_proj)
        base.register_forward_hook(lambda module, inputs, out, name=name: dtypes.__setitem__(name, out.dtype))
        LayerStep(model, torch.randn(2, 5, 32, requires_grad=True), torch.arange(2), BY_NAME[name].precision)()
    assert dtypes == {"mode16x4x1_bf16": torch.bfloat16, "mode16x4x1": torch.float32, "floor_bf16": torch.bfloat16}


def test_toy_report_has_the_top_k_and_bf16_rows(tmp_path):
    only = "floor,mode16x4x1,mode16x4x1_top1,floor_bf16,mode16x4x1_bf16"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--quick", "--model", "tiny_random", "--rounds",
                           "2", "--out", str(tmp_path), "--parts", "step,layer", "--only", only], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    assert list(results["step"]["setups"]) == list(results["layer"]["setups"]) == only.split(",")
    assert all(len(s["times_s"]) == 2 for s in results["step"]["setups"].values())
    assert results["step"]["run"]["machine"]["mkldnn_bf16"] in (True, False)
    report = (tmp_path / "bench.md").read_text()
    top_k = report.split("## Top-k routing (`adapter.top_k`)")[1].split("\n## ")[0]
    assert re.search(r"\| MoDE 16x4x1 top-1 \| MoDE 16x4x1 \| \d+\.\d{3} \| [\d.]+-[\d.]+ \| \d+\.\d{3} \|", top_k)
    assert "the same multiply-adds" in top_k and "MoDE 16x4x1 top-1" in top_k.split("\n\n")[-1]
    bf16 = report.split("## bf16 autocast (`train.precision=bf16`)")[1].split("\n## ")[0]
    for row in (r"\| frozen base \(floor\) bf16 \| frozen base \(floor\) \|", r"\| MoDE 16x4x1 bf16 \| MoDE 16x4x1 \|"):
        assert re.search(row + r" \d+\.\d{3} \|", bf16), row
    assert "This CPU (" in bf16


def test_no_bf16_leaves_out_exactly_the_bf16_setups():
    """`--no-bf16` (for CPUs without native bf16, where these rows take ~20x fp32) drops the bf16 rows and
    nothing else, with or without --only."""
    from benchmarks.bench import parse, selected
    from benchmarks.setups import SETUPS

    every = [s.name for s in selected(parse([]))]
    kept = [s.name for s in selected(parse(["--no-bf16"]))]
    assert every == [s.name for s in SETUPS] and any(s.precision == "bf16" for s in SETUPS)
    assert kept == [s.name for s in SETUPS if s.precision != "bf16"]
    assert [s.name for s in selected(parse(["--no-bf16", "--only", "lora64,lora64_bf16"]))] == ["lora64"]
