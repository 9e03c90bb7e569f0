"""Memory figures of the core model (issue 2), each next to its baseline, measured in child processes.

1. SSD scan: peak extra memory of `ssd_chunked` for a 4096-token prompt at Bamba-9B Mamba shapes
   (128 heads x 64, d_state 128, 1 group, chunk 256), against transformers' reference scan on the same
   inputs (transformers.models.bamba.modeling_bamba.mamba2_chunk_scan).
2. Loading: peak RSS of `BambaForCausalLM.from_pretrained` on a >= 1 GB checkpoint (bench-small, fp32,
   created once with random weights), against transformers' from_pretrained of the same folder.

Peak memory is the process's VmHWM (peak RSS) after resetting it through /proc/self/clear_refs, minus
the RSS before the measured step. Run: python benchmarks/bench_memory.py [--checkpoint DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def scan_child(impl: str, length: int) -> dict:
    import torch

    torch.manual_seed(0)
    b, h, p, g, n, q = 1, 128, 64, 1, 128, 256
    x = torch.randn(b, length, h, p)
    dt = torch.rand(b, length, h) * 0.1
    A = -torch.rand(h)
    B = torch.randn(b, length, g, n)
    C = torch.randn(b, length, g, n)
    D = torch.ones(h)
    out_bytes = x.numel() * 4
    _reset_peak()
    base = _status("VmRSS")
    with torch.no_grad():
        if impl == "bamba":
            from bamba.ssd import ssd_chunked

            y, _ = ssd_chunked(x, dt, A, B, C, q, D)
        else:
            from transformers.models.bamba.modeling_bamba import mamba2_chunk_scan

            y = mamba2_chunk_scan(x, dt, A, B, C, q, D=D, return_final_states=True)[0]
    peak = _status("VmHWM") - base
    return {
        "impl": impl,
        "length": length,
        "peak_extra_bytes": peak,
        "output_bytes": out_bytes,
        "y_sum": float(y.sum()),
    }


def load_child(impl: str, folder: str) -> dict:
    import torch

    weights = sum(
        os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors")
    )
    if impl == "bamba":
        from bamba import BambaForCausalLM
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        BambaForCausalLM = transformers.BambaForCausalLM
    _reset_peak()
    base = _status("VmRSS")  # after the imports: what loading and the forward add
    if impl == "bamba":
        model = BambaForCausalLM.from_pretrained(folder)
    else:
        model = BambaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loaded = _status("VmHWM") - base
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 16)))
    after_forward = _status("VmHWM") - base
    return {
        "impl": impl,
        "weights_bytes": weights,
        "peak_rss_load": loaded,
        "peak_rss_load_and_forward": after_forward,
    }


def ensure_checkpoint(folder: str) -> None:
    if os.path.isfile(os.path.join(folder, "config.json")):
        return
    import torch

    from bamba import BambaForCausalLM
    from bamba.config import preset

    torch.manual_seed(0)
    BambaForCausalLM(preset("bench-small")).save_pretrained(folder, max_shard_size="2GB")


def run(kind: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=".bench/bench-small-fp32")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        result = scan_child(rest[0], int(rest[1])) if kind == "scan" else load_child(rest[0], rest[1])
        print(json.dumps(result))
        return
    results = {"scan": [run("scan", impl, str(args.length)) for impl in ("bamba", "transformers")]}
    ensure_checkpoint(args.checkpoint)
    results["load"] = [run("load", impl, args.checkpoint) for impl in ("bamba", "transformers")]
    gib = 2**30
    print(
        f"SSD scan, {args.length} tokens at Bamba-9B Mamba shapes (output itself: {results['scan'][0]['output_bytes'] / gib:.2f} GiB)"
    )
    for r in results["scan"]:
        print(f"  {r['impl']:<13} peak extra memory {r['peak_extra_bytes'] / gib:6.2f} GiB")
    w = results["load"][0]["weights_bytes"]
    print(f"Loading {args.checkpoint} ({w / gib:.2f} GiB of safetensors)")
    for r in results["load"]:
        print(
            f"  {r['impl']:<13} peak RSS load {r['peak_rss_load'] / gib:5.2f} GiB = {r['peak_rss_load'] / w:.2f}x weights;"
            f" with a first forward {r['peak_rss_load_and_forward'] / gib:5.2f} GiB = {r['peak_rss_load_and_forward'] / w:.2f}x"
        )
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
