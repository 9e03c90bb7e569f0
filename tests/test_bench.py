"""`bamba bench` end to end on a tiny checkpoint: both implementations measured, figures reported."""

from __future__ import annotations

import json

import pytest
from conftest import TINY

from bamba import BambaConfig, BambaForCausalLM
from bamba.bench import bench


def test_bench_reports_both_implementations(tmp_path, capsys):
    BambaForCausalLM(BambaConfig(**TINY)).save_pretrained(tmp_path / "m")
    report = bench(
        checkpoint=str(tmp_path / "m"),
        threads=1,
        quick=True,
        variants=("fp32",),
        json_path=str(tmp_path / "r.json"),
        allocator="tuned",
    )
    assert report["allocator"] == "tuned" and json.loads((tmp_path / "r.json").read_text())["rows"]
    rows = {(r["measure"], r.get("prompt")): r for r in report["rows"]}
    assert set(rows) == {
        ("prefill_512", None),
        ("prefill_2048", None),
        ("decode_b1", 128),
        ("decode_b8", 128),
    }
    for r in rows.values():
        assert r["bamba"] > 0 and r["transformers_fp32"] > 0 and r["ratio"] > 0
        assert r["bamba_peak_rss"] > 0 and r["transformers_peak_rss"] > 0 and 0 < r["limit_fraction"] < 1
    lim = report["limits"]
    assert lim["sgemm_flops"] == max(
        v for k, v in lim.items() if k.startswith("sgemm_") and k != "sgemm_flops"
    )
    table = capsys.readouterr().out
    assert (
        "tuned allocator" in table
        and "decode_b8" in table
        and f"fp32 matmuls: {lim['fp32_matmuls']}" in table
    )


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
