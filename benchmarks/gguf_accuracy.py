"""How close llama.cpp's logits on an exported GGUF come to ours: `bamba export-gguf` in each type, and
(with --llama-cpp PATH) llama.cpp's own converter, on one checkpoint and one 64-token prompt.

    pip install llama-cpp-python==0.3.36    # llama.cpp, built from source
    pip download llama-cpp-python==0.3.36 --no-deps -d /tmp/lcp && tar xzf /tmp/lcp/*.tar.gz -C /tmp/lcp
    python benchmarks/gguf_accuracy.py --llama-cpp /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp

Prints, per file: max |diff| of the logits over the prompt (and as a fraction of the logit scale, the
largest |logit| of ours), the positions whose argmax agrees, and how many of 32 greedy tokens agree before
the first difference.
llama.cpp runs with f32 keys and values (its default cache is f16) and one thread. Accuracy only: no timing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

from bamba import BambaForCausalLM, Tokenizer
from bamba.demo import demo_path
from bamba.gguf_export import TYPES, export_gguf

TEXT = (
    "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
    "Arise, fair sun, and kill the envious moon,\nWho is already sick and pale with grief,\n"
    "That thou her maid art far more fair than she:\nBe not her maid, since she is envious;\n"
)

# llama.cpp's converter, run from its source tree with its own gguf-py. Its tokenizer check hashes the
# tokens of a test string against a list of known models; a checkpoint whose tokenizer is not among them (the
# demo's) is refused, so --pre NAME names the pre-tokenizer instead (this changes no tensor).
STOCK = """
import sys
src, pre, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path[:0] = [src, src + "/gguf-py"]
if pre:
    from conversion import base
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = ["convert_hf_to_gguf.py", *args]
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def llama(path: str, ids: list[int], n_new: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits over `ids` (L, V), then `n_new` greedy tokens (one decode step each)."""
    import llama_cpp

    if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
        # llama.cpp's AMX kernels crash in the prefill of q8_0 / q4_0 files (whoever wrote them): load the
        # weights into its plain CPU kernels (as tests/test_gguf.py does)
        default = llama_cpp.llama_cpp.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_cpp.llama_model_default_params = params
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=256,
        n_batch=256,
        n_ubatch=256,
        logits_all=True,
        n_threads=1,
        n_threads_batch=1,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    out: list[int] = []
    for _ in range(n_new):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    llm.close()
    return logits, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=None, help="checkpoint folder (default: the embedded demo model)")
    p.add_argument("--types", default=",".join(TYPES), help="export types, comma-separated (default: all)")
    p.add_argument("--llama-cpp", default=None, help="llama.cpp source tree: also run its converter (f32)")
    p.add_argument("--pre", default="gpt-2", help="pre-tokenizer name given to llama.cpp's converter")
    p.add_argument("--tokens", type=int, default=64, help="prompt length (default: 64)")
    args = p.parse_args()
    folder = args.folder or demo_path()
    torch.set_num_threads(1)

    ids = Tokenizer.from_pretrained(folder).encode(TEXT * 8)[: args.tokens]
    model = BambaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double().numpy()  # (L, V)
    greedy = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None)
    greedy = greedy[0, len(ids) :].tolist()
    scale = np.abs(ours).max()
    print(f"{folder}: {len(ids)} prompt tokens, logit scale (max |logit|) {scale:.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for t in args.types.split(","):
            files[f"export-gguf {t}"] = export_gguf(folder, os.path.join(tmp, f"{t}.gguf"), type=t)
        if args.llama_cpp:
            out = os.path.join(tmp, "stock-f32.gguf")
            cmd = [sys.executable, "-c", STOCK, args.llama_cpp, args.pre, folder, "--outfile", out]
            run = subprocess.run([*cmd, "--outtype", "f32"], capture_output=True, text=True)
            if run.returncode:
                print(f"llama.cpp's converter failed:\n{run.stderr[-2000:]}")
            else:
                files["convert_hf_to_gguf.py f32"] = out
        print(
            "| file | max abs diff | / scale | argmax agrees | greedy tokens equal (of 32) |\n|---|---|---|---|---|"
        )
        for name, path in files.items():
            theirs, their_greedy = llama(path, ids, 32)
            diff = np.abs(ours - theirs).max()
            agree = (ours.argmax(-1) == theirs.argmax(-1)).mean()
            same = next((i for i, (a, b) in enumerate(zip(greedy, their_greedy)) if a != b), len(greedy))
            print(f"| {name} | {diff:.2e} | {diff / scale:.2e} | {agree:.1%} | {same}/32 |")


if __name__ == "__main__":
    main()
