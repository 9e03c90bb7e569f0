#!/usr/bin/env bash
# Train the embedded demo model (preset "demo": ~5M parameters, vocab 2048) from scratch on one text corpus.
#
#   recipes/train_demo.sh ../shared/data/tinyshakespeare.txt            # -> runs/demo/final
#   recipes/train_demo.sh CORPUS.txt OUT_DIR [extra `bamba train` options...]
#
# Step 1 trains a byte-level BPE tokenizer with 2048 tokens (pad=0, bos=1, eos=2) on the corpus.
# Step 2 trains the model: documents are the corpus's blank-line separated paragraphs, BOS + text + EOS,
# packed without padding into rows of 1024 tokens; 4 rows (~4000 tokens) per optimizer step, 600 steps
# (~2.3M tokens: ~6 epochs of tinyshakespeare, ~35 min at 1 thread on this CPU); 5% of the
# documents are held out for the eval loss. OUT_DIR/final is a Hugging Face folder (config.json,
# model.safetensors, tokenizer files) that `BambaForCausalLM.from_pretrained` and transformers load.
# Step 3 writes OUT_DIR/demo: the same model stored in bfloat16 (half the size), which is what ships in
# src/bamba/demo/ (copy its files there).
#
# Interrupted? Run the same command again: it continues from OUT_DIR/checkpoint-last with the same data
# order and the same losses. Several processes: `torchrun --nproc-per-node N -m bamba train ...` with
# --grad-accum divided by N keeps the global batch. On a busy CPU, --threads 1 is often the fastest.
set -euo pipefail

CORPUS=${1:?usage: recipes/train_demo.sh CORPUS.txt [OUT_DIR] [extra bamba train options]}
OUT=${2:-runs/demo}
shift $(( $# >= 2 ? 2 : 1 ))

if [[ ! -f "$OUT/tokenizer/tokenizer.json" ]]; then
    bamba train-tokenizer "$CORPUS" --vocab-size 2048 --out "$OUT/tokenizer"
fi

bamba train \
    --config demo \
    --data "$CORPUS" \
    --tokenizer "$OUT/tokenizer" \
    --out "$OUT" \
    --row-tokens 1024 \
    --batch-rows 4 \
    --grad-accum 1 \
    --max-steps 600 \
    --lr 1.5e-3 \
    --min-lr-ratio 0.1 \
    --warmup-steps 30 \
    --weight-decay 0.1 \
    --eval-every 100 \
    --save-every 50 \
    --seed 0 \
    --threads 1 \
    "$@"

python - "$OUT" <<'PY'
import shutil, sys
from pathlib import Path

from bamba import BambaForCausalLM

out = Path(sys.argv[1])
BambaForCausalLM.from_pretrained(out / "final").save_pretrained(out / "demo", dtype="bfloat16")
for f in (out / "final").iterdir():
    if f.name.startswith(("tokenizer", "special_tokens")):
        shutil.copy(f, out / "demo" / f.name)
print(f"demo model written to {out / 'demo'}")
PY
