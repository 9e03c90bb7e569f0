"""`bamba bench` end to end on a tiny checkpoint: both implementations measured, figures reported."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY
from torch import nn

from bamba import BambaConfig, BambaForCausalLM, HybridMambaAttentionDynamicCache
from bamba.bench import bench, harness

LIMITS = {  # the machine-limits child's report, made up: it takes ~15 s and 2 GB to measure
    "cpu": "a test CPU",
    "sgemm_flops": 1e11,
    "int8_gemm_ops": 2e11,
    "mem_bandwidth": 1e10,
    "fp32_matmuls": "BLAS",
}


def test_bench_reports_both_implementations(tmp_path, capsys, monkeypatch):
    """`bench(quick=True)` on a tiny checkpoint with its plan shrunk (a 16-token prefill; batches 1 and 2
    decoding 2 steps after 8 tokens): each implementation measured in children of its own, figures
    reported. The fractions of the machine's limits are checked against the FLOPs of the model's own
    Linear layers and the bytes of a filled cache (known limits stand in for the limits child)."""
    bench_mod = harness()  # benchmarks/bench.py
    folder = tmp_path / "m"
    BambaForCausalLM(BambaConfig(**TINY)).save_pretrained(folder)
    quick = bench_mod.plan(True, ("fp32",), False, True)
    assert [[(s["impl"], s["kind"]) for s in group] for group in quick] == [
        [("transformers", "prefill"), ("bamba", "prefill")],
        [("transformers", "decode"), ("bamba", "decode")],
    ]
    tiny = {"prefill": dict(lengths=(16,)), "decode": dict(prompts=(8,), batches=(1, 2), steps=2)}
    shrunk = [[{**s, **tiny[s["kind"]]} for s in group] for group in quick]
    monkeypatch.setattr(bench_mod, "plan", lambda *a: shrunk)
    real_child, specs = bench_mod._child, []

    def child(spec, threads):
        specs.append(spec)
        return dict(LIMITS) if spec.get("limits") else real_child(spec, threads)

    monkeypatch.setattr(bench_mod, "_child", child)
    report = bench(
        checkpoint=str(folder),
        threads=1,
        quick=True,
        variants=("fp32",),
        json_path=str(tmp_path / "r.json"),
        allocator="tuned",
    )
    assert len(specs) == 5 and all(s["allocator"] == "tuned" for s in specs)  # limits + 4 workers
    assert report["allocator"] == "tuned" and json.loads((tmp_path / "r.json").read_text())["rows"]
    rows = {(r["measure"], r.get("prompt")): r for r in report["rows"]}
    assert set(rows) == {("prefill_16", None), ("decode_b1", 8), ("decode_b2", 8)}
    for r in rows.values():
        assert r["bamba"] > 0 and r["transformers_fp32"] > 0
        assert r["ratio"] == pytest.approx(r["bamba"] / r["transformers_fp32"])
        assert r["bamba_peak_rss"] > 0 and r["transformers_peak_rss"] > 0

    model = BambaForCausalLM.from_pretrained(str(folder))
    cfg = model.config
    # prefill: 2 FLOPs per weight of every Linear but the lm_head, and causal attention's two products
    # (2 FLOPs per multiply-add, over the l / 2 earlier tokens on average) per attention layer
    linear = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"
    )
    n_attn = len(cfg.attn_layer_indices)
    flops = 2 * linear + n_attn * 2 * 2 * (16 / 2) * cfg.num_attention_heads * cfg.attention_head_dim
    prefill = rows[("prefill_16", None)]
    assert prefill["limit_fraction"] == pytest.approx(prefill["bamba"] * flops / LIMITS["sgemm_flops"])
    # decode: a step reads every weight but the (untied) embedding table, reads and writes the Mamba
    # states, and reads the keys and values, here at mid-run (8 + 2 // 2 tokens)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights -= model.model.embed_tokens.weight.numel() * 4
    for b in (1, 2):
        cache = HybridMambaAttentionDynamicCache(cfg)
        with torch.no_grad():
            model(torch.randint(1, 97, (b, 9)), past_key_values=cache)
        mamba = sum(t.numel() * 4 for t in (*cache.conv_states, *cache.ssm_states) if t is not None)
        kv = sum(t.numel() * 4 for t in (*cache.key_cache, *cache.value_cache) if t is not None)
        row = rows[(f"decode_b{b}", 8)]
        per_token = (weights + 2 * mamba + kv) / b
        assert row["limit_fraction"] == pytest.approx(row["bamba"] * per_token / LIMITS["mem_bandwidth"])
    table = capsys.readouterr().out
    assert "tuned allocator" in table and "decode_b2" in table and "machine: a test CPU" in table


def test_machine_limits_arithmetic(monkeypatch):
    """FLOP/s and op/s from the best of five timings of an n x n product: 2 n^3 / seconds; sgemm_flops is
    the faster of BLAS and oneDNN. Timings are made up (the measured ones take seconds)."""
    bench_mod = harness()
    onednn = bench_mod.onednn_available()
    times = iter([0.5, 0.25, 0.3, 0.4, 0.5] + ([0.125, 0.2, 0.3, 0.4, 0.5] if onednn else []))
    monkeypatch.setattr(bench_mod, "_timed", lambda fn: next(times))
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    flops = bench_mod._sgemm_flops(a, b)
    assert flops["sgemm_blas_flops"] == 2 * 64**3 / 0.25
    if onednn:
        assert flops["sgemm_onednn_flops"] == 2 * 64**3 / 0.125 == flops["sgemm_flops"]
    else:
        assert flops["sgemm_flops"] == flops["sgemm_blas_flops"]
    times = iter([4.0, 2.0, 8.0, 3.0, 5.0])
    assert bench_mod._int8_gemm_ops(a, b) == 2 * 64**3 / 2.0


def test_bench_command_line_options(monkeypatch):
    """--long, --rounds, --allocator, --llama-cpp (and the rest) reach bench as keyword arguments; --long
    adds a 32768-token prefill, chunked. Both implementations get the tuned allocator unless told not to
    (transformers' batched decoding is 2.4x slower with glibc's malloc as it comes)."""
    from bamba import cli

    calls = []
    monkeypatch.setattr(cli, "bench", lambda **kw: calls.append(kw) or {})
    argv = [
        "bench",
        "--long",
        "--rounds",
        "3",
        "--allocator",
        "default",
        "--quick",
        "--variants",
        "fp32,int8",
    ]
    assert (
        cli.main([*argv, "--no-transformers", "--threads", "4", "--json", "r.json", "--llama-cpp", "b"]) == 0
    )
    assert calls == [
        dict(
            checkpoint=None,
            threads=4,
            quick=True,
            variants=("fp32", "int8"),
            long_prompt=True,
            transformers=False,
            json_path="r.json",
            allocator="default",
            rounds=3,
            llama_cpp="b",
        )
    ]
    assert cli.main(["bench"]) == 0
    assert calls[-1]["allocator"] == "tuned" and calls[-1]["llama_cpp"] is None
    groups = harness().plan(True, ("fp32",), True, False)
    assert groups[-1] == [
        dict(impl="bamba", kind="prefill", variant="fp32", lengths=(32768,), chunk=2048, reps=1)
    ]
    assert all(len(g) == 1 for g in groups)  # no transformers: ours alone


def test_bench_worker_applies_the_allocator_setting(monkeypatch, capsys):
    """A child tunes its allocator before measuring when the spec says "tuned", and only then."""
    bench_mod = harness()
    tuned = []
    monkeypatch.setattr(bench_mod, "tune_cpu_allocator", lambda: tuned.append(1) or True)
    monkeypatch.setattr(bench_mod, "machine_limits", lambda threads: {"tuned_before": bool(tuned)})
    for allocator, want in (("default", False), ("tuned", True)):
        tuned.clear()
        bench_mod._worker_main(json.dumps({"limits": True, "threads": 1, "allocator": allocator}))
        assert json.loads(capsys.readouterr().out) == {"tuned_before": want}, allocator


def test_bench_rejects_unknown_variants(tmp_path):
    with pytest.raises(ValueError, match="variant 'int3': expected one of fp32, bf16, int8, int4, int8dq"):
        bench(checkpoint=str(tmp_path / "never-created"), variants=("fp32", "int3"))
    assert not (tmp_path / "never-created").exists()


def test_bench_without_transformers_says_so_before_creating_anything(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a)
    )
    with pytest.raises(ValueError, match="transformers, which is not installed.*--no-transformers"):
        bench(checkpoint=str(tmp_path / "never-created"))
    assert not (tmp_path / "never-created").exists()


def test_bench_checks_its_arguments_before_measuring(tmp_path):
    """A typo in --checkpoint created a 1.35 GB random model there; --threads 0 failed in a child after
    the checkpoints were built; an unwritable --json path lost the whole run at its end."""
    BambaForCausalLM(BambaConfig(**TINY)).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="checkpoint='.*typo': no config.json there"):
        bench(checkpoint=str(tmp_path / "typo"), transformers=False)
    assert not (tmp_path / "typo").exists()
    for threads in (0, -2, 1.5):
        with pytest.raises(ValueError, match=f"threads={threads!r}: expected an integer >= 1"):
            bench(checkpoint=str(tmp_path / "m"), threads=threads, transformers=False)
    with pytest.raises(ValueError, match="is not a writable folder"):
        bench(checkpoint=str(tmp_path / "m"), json_path=str(tmp_path / "no" / "r.json"), transformers=False)
    assert not (tmp_path / "m-int8").exists()  # nothing was built


def test_bench_rounds_pair_the_measures_and_report_medians(tmp_path, monkeypatch, capsys):
    """With rounds=3 each fp32 measure of transformers runs right beside ours, the pair's order
    alternating; each figure is the median over rounds with its range, the ratio the median of the rounds'
    own ratios. The children are replaced by a recorder that gives known figures."""
    bench_mod = harness()  # benchmarks/bench.py

    BambaForCausalLM(BambaConfig(**TINY)).save_pretrained(tmp_path / "m")
    calls = []
    ours = iter([20.0, 20.0, 30.0, 30.0, 24.0, 24.0])  # bamba's figure in rounds 1, 2, 3

    def fake_child(spec, threads):
        if spec.get("limits"):
            return {"sgemm_flops": 1e12, "int8_gemm_ops": 1e12, "mem_bandwidth": 1e12}
        calls.append((spec["impl"], spec["kind"]))
        value = 10.0 if spec["impl"] == "transformers" else next(ours)
        keys = (
            [f"prefill_{n}" for n in spec["lengths"]]
            if spec["kind"] == "prefill"
            else ["decode_b1_after_128"]
        )
        rss = 1000 + len(calls)
        return {k: value for k in keys} | {"weight_bytes": 1, "step_weight_bytes": 1, "peak_rss": rss}

    monkeypatch.setattr(bench_mod, "_child", fake_child)
    monkeypatch.setattr(
        bench_mod,
        "plan",
        lambda *a: [
            [dict(impl=i, **s) for i in ("transformers", "bamba")]
            for s in (
                dict(kind="prefill", variant="fp32", lengths=(512,)),
                dict(kind="decode", variant="fp32", prompts=(128,), batches=(1,), steps=4),
            )
        ],
    )
    report = bench(checkpoint=str(tmp_path / "m"), variants=("fp32",), rounds=3)
    T, B = "transformers", "bamba"
    pairs = [[(T, "prefill"), (B, "prefill")], [(T, "decode"), (B, "decode")]]
    round_1 = [call for pair in pairs for call in pair]
    round_2 = [call for pair in pairs for call in pair[::-1]]  # each pair's order alternates
    assert calls == round_1 + round_2 + round_1
    assert report["rounds"] == 3 and [r["measure"] for r in report["rows"]] == ["prefill_512", "decode_b1"]
    for row in report["rows"]:
        assert row["bamba"] == 24.0 and row["bamba_range"] == [20.0, 30.0]
        assert row["transformers_fp32"] == 10.0 and row["transformers_fp32_range"] == [10.0, 10.0]
        assert row["ratio"] == 2.4 and row["ratio_range"] == [2.0, 3.0]
    # peak RSS: the largest of the rounds (the recorder's RSS is 1000 + its call number)
    prefill, decode = report["rows"]
    assert (prefill["bamba_peak_rss"], prefill["transformers_peak_rss"]) == (1010, 1009)
    assert (decode["bamba_peak_rss"], decode["transformers_peak_rss"]) == (1012, 1011)
    table = capsys.readouterr().out
    assert "medians of 3 rounds" in table
    assert sum(" 2.40x " in line and line.endswith(" 2.00-3.00x") for line in table.splitlines()) == 2
    with pytest.raises(ValueError, match="rounds=0: expected an integer >= 1"):
        bench(checkpoint=str(tmp_path / "m"), rounds=0)


def test_bench_decodes_short_and_long_prompts_side_by_side(tmp_path, monkeypatch, capsys):
    """One decode child per implementation measures every prompt length, interleaved: rows per (batch,
    prompt), and the extra cost of a token after the long prompt (the same child's two figures). A real
    child on a tiny checkpoint, then the report's arithmetic with a recording child."""
    run_case = harness().run_case

    BambaForCausalLM(BambaConfig(**TINY)).save_pretrained(tmp_path / "m")
    r = run_case("bamba", str(tmp_path / "m"), 1, "decode", prompts=(16, 64), batches=(1, 2), steps=3)
    assert {k for k in r if k.startswith("decode_")} == {
        "decode_b1_after_16",
        "decode_b1_after_64",
        "decode_b2_after_16",
        "decode_b2_after_64",
    }
    assert all(r[k] > 0 for k in r if k.startswith("decode_"))

    bench_mod = harness()  # benchmarks/bench.py

    # tok/s at batch 1 by implementation and prompt; alone: the 16-token prompt decoded in its own child
    figures = {"bamba": {16: 30.0, 64: 25.0}, "transformers": {16: 10.0, 64: 5.0}}
    alone = {"bamba": 33.0, "transformers": 11.0}

    def fake_child(spec, threads):
        if spec.get("limits"):
            return {"sgemm_flops": 1e12, "int8_gemm_ops": 1e12, "mem_bandwidth": 1e12}
        tok = figures[spec["impl"]] if len(spec["prompts"]) > 1 else {16: alone[spec["impl"]]}
        return {f"decode_b{b}_after_{p}": b * tok[p] for b in spec["batches"] for p in spec["prompts"]} | {
            "weight_bytes": 1,
            "step_weight_bytes": 1,
            "peak_rss": 1,
        }

    monkeypatch.setattr(bench_mod, "_child", fake_child)
    monkeypatch.setattr(
        bench_mod,
        "plan",
        lambda *a: [
            [
                dict(impl=i, kind="decode", variant="fp32", prompts=prompts, batches=(1, 8), steps=4)
                for i in ("transformers", "bamba")
            ]
            for prompts in ((16,), (16, 64))
        ],
    )
    rows = bench(checkpoint=str(tmp_path / "m"), variants=("fp32",))["rows"]
    # the 16-token figures from the child of their own; the 64-token ones from the shared child, whose
    # 16-token figures are only the baseline of extra_cost
    assert [(r["measure"], r["prompt"]) for r in rows] == [
        ("decode_b1", 16),
        ("decode_b8", 16),
        ("decode_b1", 64),
        ("decode_b8", 64),
    ]
    assert [r["bamba"] for r in rows] == [33.0, 264.0, 25.0, 200.0]
    assert [r["transformers_fp32"] for r in rows] == [11.0, 88.0, 5.0, 40.0]
    assert [r.get("extra_cost") for r in rows] == [None, None, pytest.approx(0.2), pytest.approx(0.2)]
    assert rows[3]["transformers_extra_cost"] == pytest.approx(1.0)
    assert "decode_b8: a token after 64 tokens costs +20.0% against the shortest" in capsys.readouterr().out


def test_bench_keeps_the_runs_measured_before_a_child_fails(tmp_path, monkeypatch, capsys):
    """A child that fails in a late round used to lose every figure measured before it; they are now in
    the JSON, with the error. Without transformers there is no ratio range column."""
    bench_mod = harness()  # benchmarks/bench.py

    BambaForCausalLM(BambaConfig(**TINY)).save_pretrained(tmp_path / "m")
    calls = []

    def fake_child(spec, threads):
        if spec.get("limits"):
            return {"sgemm_flops": 1e12, "int8_gemm_ops": 1e12, "mem_bandwidth": 1e12}
        calls.append(spec)
        if len(calls) == 3:
            raise RuntimeError("benchmark child failed: out of memory")
        return {"prefill_512": 10.0, "weight_bytes": 1, "step_weight_bytes": 1, "peak_rss": 1}

    monkeypatch.setattr(bench_mod, "_child", fake_child)
    monkeypatch.setattr(
        bench_mod, "plan", lambda *a: [[dict(impl="bamba", kind="prefill", variant="fp32", lengths=(512,))]]
    )
    out = tmp_path / "r.json"
    with pytest.raises(RuntimeError, match="out of memory"):
        bench(checkpoint=str(tmp_path / "m"), rounds=3, json_path=str(out), transformers=False)
    partial = json.loads(out.read_text())
    assert len(partial["runs"]) == 2 and "out of memory" in partial["error"]
    assert [r["round"] for r in partial["runs"]] == [0, 1]
    calls.clear()  # (two rounds: no third call, no failure)
    capsys.readouterr()
    report = bench(checkpoint=str(tmp_path / "m"), rounds=2, transformers=False)
    assert report["rows"][0]["bamba_range"] == [10.0, 10.0]
    assert "ratio range" not in capsys.readouterr().out


# ----- llama.cpp beside ours (--llama-cpp), with fake tools: CI has no llama.cpp ------------------------
# What the fakes print: llama-bench -o json (one record per test, as commit 0c1e570 writes them, trimmed)
# and llama-batched-bench --output-format jsonl (result lines among its log). tok/s: prefill 400 (best
# repetition; the other 300), decode at batch 1 40 after 128 tokens and 32 after 4096, batch 8 160.
FAKE_BENCH = r"""#!{python}
import json, sys
a = sys.argv
args = {a[i]: a[i + 1] for i in range(1, len(a) - 1) if a[i].startswith("-")}
assert args["-o"] == "json" and args["-t"] == "2" and args["-m"].endswith(".gguf"), sys.argv
with open(args["-m"] + ".argv", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
records = []
for p in args["-p"].split(","):
    for n in args["-n"].split(","):
        for d in args.get("-d", "0").split(","):
            p_, n_, d_ = int(p), int(n), int(d)
            if p_ == 0 and n_ == 0:
                continue
            ts = [300.0, 400.0] if n_ == 0 else [40.0 if d_ == 128 else 32.0] * 2
            records.append(dict(build_commit="0c1e570", build_number=1, n_prompt=p_, n_gen=n_, n_depth=d_,
                                avg_ts=sum(ts) / 2, samples_ts=ts, n_threads=2))
print("load_backend: loaded CPU backend", file=sys.stderr)
print(json.dumps(records, indent=2))
"""
FAKE_BATCHED = r"""#!{python}
import json, sys
a = sys.argv
args = {a[i]: a[i + 1] for i in range(1, len(a) - 1) if a[i].startswith("-")}
assert args["--output-format"] == "jsonl" and "-pps" not in sys.argv, sys.argv  # -pps fails on Bamba
print("main: n_kv_max = 4096, n_batch = 2048")
for pp in args["-npp"].split(","):
    for pl in args["-npl"].split(","):
        rec = dict(pp=int(pp), tg=int(args["-ntg"]), pl=int(pl), speed_tg=160.0, speed_pp=1.0)
        print(json.dumps(rec))
print("llama_perf_context_print: load time = 1 ms", file=sys.stderr)
"""


def fake_llama_cpp(folder) -> str:
    """A llama.cpp build folder with fake bin/llama-bench and bin/llama-batched-bench; its path."""
    import os
    import sys

    (folder / "bin").mkdir(parents=True)
    for name, text in (("llama-bench", FAKE_BENCH), ("llama-batched-bench", FAKE_BATCHED)):
        path = folder / "bin" / name
        path.write_text(text.replace("{python}", sys.executable))
        os.chmod(path, 0o755)
    return str(folder)


def test_llama_cpp_tools_are_found_from_the_build_its_bin_or_llama_bench(tmp_path):
    build = fake_llama_cpp(tmp_path / "build")
    tools_of = harness().llama_cpp_tools
    want = {"bench": f"{build}/bin/llama-bench", "batched": f"{build}/bin/llama-batched-bench"}
    assert tools_of(build) == tools_of(f"{build}/bin") == tools_of(f"{build}/bin/llama-bench") == want
    (tmp_path / "build" / "bin" / "llama-batched-bench").unlink()
    with pytest.raises(ValueError, match="llama_cpp=.*not found or not executable: .*/llama-batched-bench$"):
        tools_of(build)
    BambaForCausalLM(BambaConfig(**TINY)).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="llama_cpp='nowhere': expected a llama.cpp build"):
        bench(checkpoint=str(tmp_path / "m"), llama_cpp="nowhere", transformers=False, variants=("int8",))
    assert not (tmp_path / "m-int8").exists()  # said before anything was built


def test_llama_bench_and_batched_bench_output_parsed():
    bench_mod = harness()
    keys = ("n_prompt", "n_gen", "n_depth", "avg_ts", "samples_ts")
    records = [
        dict(zip(keys, values, strict=True), build_commit="0c1e570", build_number=7)
        for values in ((512, 0, 0, 5, [4, 6]), (0, 64, 4096, 30, [1]), (512, 64, 0, 9, [9]))
    ]
    assert bench_mod.parse_llama_bench(json.dumps(records)) == {
        "prefill_512": 6,  # the best repetition
        "decode_b1_after_4096": 30,  # the mean
        "llama_cpp_build": "0c1e570 (7)",
    }  # (a combined prompt + generation test is neither)
    with pytest.raises(ValueError, match="llama-bench output: expected a JSON list"):
        bench_mod.parse_llama_bench("| model | size |")
    with pytest.raises(ValueError, match="no prompt-only or generation-only test"):
        bench_mod.parse_llama_bench(json.dumps(records[2:]))
    log = 'main: n_kv_max = 4096\n{"pp": 128, "tg": 32, "pl": 8, "speed_pp": 90.5, "speed_tg": 71.25}\n\n'
    assert bench_mod.parse_batched_bench(log) == {"decode_b8_after_128": 71.25}
    with pytest.raises(ValueError, match="no jsonl result line"):
        bench_mod.parse_batched_bench("|    PP |     TG |    B |\n|   128 |     32 |    8 |")


def test_gguf_weight_bytes_leave_out_the_embedding_table_unless_it_is_the_lm_head(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    def write(path, names):
        w = gguf.GGUFWriter(str(path), "granitehybrid")
        for name, n in names.items():
            w.add_tensor(name, np.zeros(n, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write(tmp_path / "a.gguf", {"token_embd.weight": 1000, "output.weight": 1000, "blk.0.ffn_up.weight": 24})
    assert harness().gguf_weight_bytes(str(tmp_path / "a.gguf")) == (8096, 4096)
    write(tmp_path / "b.gguf", {"token_embd.weight": 1000, "blk.0.ffn_up.weight": 24})  # tied
    assert harness().gguf_weight_bytes(str(tmp_path / "b.gguf")) == (4096, 4096)


def test_bench_runs_llama_cpp_beside_ours_in_the_same_rounds(tmp_path, monkeypatch, capsys):
    """With --llama-cpp every configuration of ours has llama.cpp's beside it in the same group (the
    order alternating over rounds), run through its own tools (fakes here) on the GGUF of the matching
    type; the rows carry both figures, ours / llama.cpp, and each one's bytes/s; a decoder seen moving
    more than the read kernels raises the ceiling of limit%."""
    bench_mod = harness()
    BambaForCausalLM(BambaConfig(**TINY)).save_pretrained(tmp_path / "m")
    build = fake_llama_cpp(tmp_path / "build")
    exported = []

    def fake_gguf(folder, gguf_type):
        exported.append(gguf_type)
        path = tmp_path / f"{gguf_type}.gguf"
        path.touch()
        return str(path)

    monkeypatch.setattr(bench_mod, "ensure_gguf", fake_gguf)
    monkeypatch.setattr(bench_mod, "gguf_weight_bytes", lambda path: (2_000_000_000, 1_000_000_000))
    calls = []

    def fake_child(spec, threads):
        if spec.get("limits"):
            return {"sgemm_flops": 1e12, "int8_gemm_ops": 1e12, "mem_bandwidth": 30e9}
        calls.append((spec["impl"], spec["variant"], spec["kind"]))
        keys = (
            [f"prefill_{n}" for n in spec["lengths"]]
            if spec["kind"] == "prefill"
            else [f"decode_b{b}_after_{p}" for b in spec["batches"] for p in spec["prompts"]]
        )
        return {k: 20.0 for k in keys} | {"weight_bytes": 1, "step_weight_bytes": 10**9, "peak_rss": 2**30}

    monkeypatch.setattr(bench_mod, "_child", fake_child)
    monkeypatch.setattr(bench_mod, "_state_bytes", lambda cfg, b, context: 0)
    monkeypatch.setattr(
        bench_mod,
        "plan",
        lambda *a: (
            [
                [dict(impl="bamba", kind="prefill", variant=v, lengths=(512,), reps=1)]
                for v in ("fp32", "int4")
            ]
            + [
                [
                    dict(
                        impl="bamba",
                        kind="decode",
                        variant="fp32",
                        prompts=(128, 4096),
                        batches=(1, 8),
                        steps=4,
                    )
                ]
            ]
        ),
    )
    real_run = bench_mod.run_llama_cpp
    monkeypatch.setattr(
        bench_mod,
        "run_llama_cpp",
        lambda spec, threads: (
            calls.append(("llama.cpp", spec["variant"], spec["kind"])) or real_run(spec, threads)
        ),
    )
    report = bench(
        checkpoint=str(tmp_path / "m"),
        transformers=False,
        threads=2,
        rounds=2,
        llama_cpp=build,
        variants=("fp32", "int4"),
    )
    one = [("bamba", "fp32", "prefill"), ("llama.cpp", "fp32", "prefill")]
    one += [("bamba", "int4", "prefill"), ("llama.cpp", "int4", "prefill")]
    one += [("bamba", "fp32", "decode"), ("llama.cpp", "fp32", "decode")]
    other = [c for pair in zip(one[1::2], one[::2]) for c in pair]  # each pair the other way round
    assert calls == one + other
    assert exported == ["f32", "q4_0", "f32"]
    argv = (tmp_path / "f32.gguf.argv").read_text().splitlines()  # what the fake llama-bench was given
    assert "-p 512 -n 0" in argv[0] and "-p 0 -n 64 -d 128,4096" in argv[1]
    rows = {(r["variant"], r["measure"], r.get("prompt")): r for r in report["rows"]}
    assert rows["int4", "prefill_512", None]["llama_cpp_type"] == "q4_0"
    for key, theirs in (
        (("fp32", "prefill_512", None), 400.0),
        (("int4", "prefill_512", None), 400.0),
        (("fp32", "decode_b1", 4096), 32.0),
        (("fp32", "decode_b8", 4096), 160.0),
    ):
        row = rows[key]
        assert row["llama_cpp"] == theirs and row["llama_ratio"] == pytest.approx(20.0 / theirs)
        assert row["llama_ratio_range"] == [pytest.approx(20.0 / theirs)] * 2
        assert row["llama_cpp_peak_rss"] > 0
    b1, b8 = rows["fp32", "decode_b1", 4096], rows["fp32", "decode_b8", 4096]
    assert (b1["bamba_bytes_s"], b1["llama_cpp_bytes_s"]) == (20e9, 32e9)  # 1 GB per step of each
    assert (b8["bamba_bytes_s"], b8["llama_cpp_bytes_s"]) == (2.5e9, 20e9)
    assert b1["llama_cpp_extra_cost"] == pytest.approx(40 / 32 - 1)
    # llama.cpp moved 32 GB/s where the read kernels found 30: the ceiling, and ours is 20 / 32 of it
    assert report["limits"]["mem_bandwidth_ceiling"] == 32e9
    assert b1["limit_fraction"] == pytest.approx(20 / 32) and b8["limit_fraction"] == pytest.approx(2.5 / 32)
    table = capsys.readouterr().out
    assert "a decoder moved 32.0 GB/s in this run" in table and "build 0c1e570 (1)" in table
    assert any(
        line.split()[:6] == ["fp32", "decode_b1", "4096", "f32", "20.0", "32.0"]
        for line in table.splitlines()
    )


def test_llama_cpp_through_the_bindings_decodes_as_the_tools_do(monkeypatch):
    """`--llama-cpp python`: a fake llama_cpp module records the llama_decode calls. Batch 1: the prompt,
    then LLAMA_B1_TOKENS single tokens at the next positions, LLAMA_REPS times; batch 2: the prompt once
    on row 0, copied to row 1, then one token per row per step."""
    import sys
    from types import SimpleNamespace

    bench_mod = harness()
    calls = []

    class Batch:
        def __init__(self):
            self.token, self.pos, self.n_seq_id, self.logits = [0] * 2048, [0] * 2048, [0] * 2048, [0] * 2048
            self.seq_id, self.n_tokens = [[0] for _ in range(2048)], 0

    def decode(ctx, batch):
        n = batch.n_tokens
        calls.append(("decode", [(batch.pos[i], batch.seq_id[i][0]) for i in range(n)], batch.logits[n - 1]))
        return 0

    params, model_params = SimpleNamespace(), SimpleNamespace(use_extra_bufts=True)
    fake = SimpleNamespace(
        llama_backend_init=lambda: None,
        llama_model_default_params=lambda: model_params,
        llama_model_load_from_file=lambda path, p: "model",
        llama_model_get_vocab=lambda m: "vocab",
        llama_vocab_n_tokens=lambda v: 100,
        llama_context_default_params=lambda: params,
        llama_init_from_model=lambda m, p: "ctx",
        llama_get_memory=lambda c: "mem",
        llama_batch_init=lambda n, embd, seqs: Batch(),
        llama_decode=decode,
        llama_synchronize=lambda c: None,
        llama_memory_clear=lambda mem, data: calls.append(("clear",)),
        llama_memory_seq_cp=lambda mem, src, dst, p0, p1: calls.append(("copy", src, dst, p0, p1)),
        llama_batch_free=lambda b: None,
        llama_free=lambda c: None,
        llama_model_free=lambda m: None,
    )
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    monkeypatch.setattr(bench_mod, "gguf_weight_bytes", lambda path: (2, 1))
    spec = dict(
        variant="int4", kind="decode", prompts=(8,), batches=(1, 2), steps=2, gguf="x.gguf", threads=3
    )
    out = bench_mod.llama_cpp_python_case(spec)
    assert out["decode_b1_after_8"] > 0 and out["decode_b2_after_8"] > 0 and out["step_weight_bytes"] == 1
    assert (params.n_ctx, params.n_seq_max, params.n_threads, params.n_threads_batch) == (2 * 88, 2, 3, 3)
    assert model_params.use_extra_bufts is False
    warm, *rest = calls
    assert warm == ("decode", [(i, 0) for i in range(16)], 1)
    n = bench_mod.LLAMA_B1_TOKENS
    one = [("clear",), ("decode", [(i, 0) for i in range(8)], 1)]
    one += [("decode", [(8 + i, 0)], 1) for i in range(n)]
    two = [("clear",), ("decode", [(i, 0) for i in range(8)], 1), ("copy", 0, 1, -1, -1)]
    two += [("decode", [(8 + i, 0), (8 + i, 1)], 1) for i in range(2)]
    assert rest == one * bench_mod.LLAMA_REPS + two
