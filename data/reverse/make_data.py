"""The synthetic task of `tandem finetune`'s proof that training learns: reverse a short
sequence of letters. A random-weight base model cannot know the rule, and the held-out
sequences never occur in the training data, so getting them right means the rule was learned.

    python3 data/reverse/make_data.py      # rewrites train.jsonl, valid.jsonl, test.jsonl

Letters are those the generated tokenizer (`tandem init-model`) turns into one token each
when preceded by a space, so every letter is one token in both prompt and completion.
"""

import json
import os
import random

LETTERS = "abcdefghilmnopqrstuwy"  # j, k, v, x, z take two tokens after a space
SIZES = {"train": 4000, "valid": 200, "test": 200}


def main():
    rng = random.Random(0)
    seen = set()
    here = os.path.dirname(os.path.abspath(__file__))
    for split, count in SIZES.items():
        rows = []
        while len(rows) < count:
            word = tuple(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
            if word in seen:
                continue
            seen.add(word)
            rows.append({"prompt": "reverse: " + " ".join(word) + "\n=", "completion": " " + " ".join(reversed(word))})
        with open(os.path.join(here, f"{split}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
