"""Write cerberus_decoding/data/calibration_prompts.jsonl: prompts held out from head training.

Calibration must not be measured on what the heads were trained on (that flatters acceptance) nor
on the bench questions (that flatters the bench). The shipped heads were distilled on
``load_prompts("corpus/instructions", 40000, corpus/heads.mix, seed 0)``; every corpus prompt outside
that selection is a candidate. From the permissively licensed sources (MIT, Apache-2.0, CC0; the
CC BY-SA files stay out of the package), prompts of at most 600 characters are drawn in proportion
to each source's share of the mix, seeded.

    python scripts/make_calibration_prompts.py [--n 240]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from cerberus_decoding.bench.questions import BUILTIN_PATH, parse_questions
from cerberus_decoding.train.prompts import load_prompts, parse_mix, read_prompt_file

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "corpus" / "instructions"
MIX = ROOT / "corpus" / "heads.mix"
OUT = ROOT / "cerberus_decoding" / "data" / "calibration_prompts.jsonl"
TRAINING = (40000, 0)  # num_prompts, seed of the shipped heads' distillation (scripts/make_heads.sh)
PERMISSIVE = ("gsm8k_train", "gpteacher", "self_instruct_seed", "awesome_chatgpt_prompts", "oasst_eval_prompts",
              "flan_cot_train", "p3_t0_subset")
MAX_CHARS = 600


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=240)
    args = ap.parse_args()
    mix = parse_mix(MIX.read_text().strip())
    trained, _ = load_prompts(str(CORPUS), TRAINING[0], MIX.read_text().strip(), TRAINING[1])
    excluded = {p.text for p in trained} | {t for q in parse_questions(BUILTIN_PATH) for t in q.turns}
    shares = {s: mix[s] for s in PERMISSIVE}
    total = sum(shares.values())
    rng = random.Random(0)
    out = []
    for source, share in shares.items():
        pool = [p for p in read_prompt_file(CORPUS / f"{source}.jsonl.xz")
                if p.text not in excluded and len(p.text) <= MAX_CHARS]
        rng.shuffle(pool)
        out += pool[: max(1, round(args.n * share / total))]
    rng.shuffle(out)
    OUT.write_text("".join(json.dumps({"prompt": p.text, "source": p.source, "category": p.category}) + "\n"
                           for p in out))
    print(f"wrote {len(out)} held-out prompts to {OUT}")


if __name__ == "__main__":
    main()
