"""A small memorization task for fine-tuning's default settings: 16 arbitrary codes, each with
one of six labels. Nothing in a code tells its label, so a model answers right only for the
examples it has learned; the score is exact match on the training examples themselves.

    python3 data/labels/make_data.py      # rewrites train.jsonl
"""

import json
import os
import random

LETTERS = "abcdefghilmnopqrstuwy"  # one token each after a space (data/reverse/make_data.py)
LABELS = ["red", "green", "blue", "black", "white", "brown"]
COUNT = 16


def main():
    rng = random.Random(0)
    codes = set()
    while len(codes) < COUNT:
        codes.add(tuple(rng.choice(LETTERS) for _ in range(4)))
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "train.jsonl"), "w") as f:
        for i, code in enumerate(sorted(codes)):
            row = {"prompt": "code: " + " ".join(code) + "\nlabel:", "completion": " " + LABELS[(i * 5) % len(LABELS)]}
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
