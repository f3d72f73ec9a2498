"""How much of a padded batch of `make demo` is padding: the most packing can save on the demo's rows.

The demo's defaults (softprompt/demo.py): its generated rows, SmolLM2's tokenizer, max_length 64, 8 virtual
tokens, batch 8. Over 2,000 random batches: the share of padded slots, and padded / real slots, the most
that removing every pad can speed up the token work (attention and per-step costs not counted).

    python bench/demo_padding.py [--lang both|en|zh]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from softprompt.data.demo import write_demo_dataset  # noqa: E402
from softprompt.data.rows import load_rows, tokenize  # noqa: E402
from softprompt.demo import DEFAULTS, LANG_CHOICES  # noqa: E402
from softprompt.io.base_models import load_base  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lang", choices=list(LANG_CHOICES), default=DEFAULTS["lang"])
    p.add_argument("--batches", type=int, default=2000)
    args = p.parse_args()
    langs, model = LANG_CHOICES[args.lang]
    _, tokenizer = load_base(model)
    with tempfile.TemporaryDirectory() as tmp:
        train, _ = write_demo_dataset(tmp, DEFAULTS["n_train"], DEFAULTS["n_eval"], 0, langs=langs)
        rows, _ = tokenize(load_rows(train), tokenizer, max_length=64, template="alpaca")
    lengths = [len(r["input_ids"]) + DEFAULTS["num_virtual_tokens"] for r in rows]
    rng = random.Random(0)
    real = padded = 0
    for _ in range(args.batches):
        batch = rng.sample(lengths, DEFAULTS["batch_size"])
        real, padded = real + sum(batch), padded + len(batch) * max(batch)
    print(f"{args.lang}: {len(lengths)} rows of {min(lengths)}-{max(lengths)} slots (mean {sum(lengths) / len(lengths):.1f}), "
          f"padding {1 - real / padded:.1%} of a padded batch of {DEFAULTS['batch_size']}: "
          f"at most {padded / real:.2f}x from packing")


if __name__ == "__main__":
    main()
