"""A mid-sized rule for fine-tuning's default settings: sort 3 to 5 letters. 1000 training
examples and 100 held-out ones (no sequence in both), so exact answers on the held-out ones
mean the rule was learned.

    python3 data/sort/make_data.py      # rewrites train.jsonl and test.jsonl
"""

import json
import os
import random

LETTERS = "abcdefghilmnopqrstuwy"  # one token each after a space (data/reverse/make_data.py)
SIZES = {"train": 1000, "test": 100}


def main():
    rng = random.Random(0)
    seen = set()
    here = os.path.dirname(os.path.abspath(__file__))
    for split, count in SIZES.items():
        rows = []
        while len(rows) < count:
            word = tuple(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
            if word in seen:
                continue
            seen.add(word)
            rows.append({"prompt": "sort: " + " ".join(word) + "\n=", "completion": " " + " ".join(sorted(word))})
        with open(os.path.join(here, f"{split}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
