"""The synthetic tasks fine-tuning is measured on (docs/finetune.md). A random-weight base model
cannot know any of them, so what it gets right it learned:

- reverse/: reverse 3 to 6 letters; 4000 training, 200 validation and 200 test sequences (the
  proof that `tandem finetune` learns a rule);
- sort/: sort 3 to 5 letters; 1000 training and 100 test sequences (a rule from fewer examples);
- labels/: 16 arbitrary codes, each with one of six labels (nothing in a code tells its label:
  memorised, and scored on the training examples themselves).

No sequence is in two files of a task. Letters are those the generated tokenizer
(`tandem init-model`) turns into one token each when preceded by a space.

    python3 data/make_data.py      # rewrites every task's files
"""

import json
import os
import random

LETTERS = "abcdefghilmnopqrstuwy"  # j, k, v, x, z take two tokens after a space
LABELS = ["red", "green", "blue", "black", "white", "brown"]
HERE = os.path.dirname(os.path.abspath(__file__))


def words(rng, sizes, lengths):
    """Distinct letter sequences for each split of `sizes`, of lengths in `lengths`."""
    seen = set()
    for split, count in sizes.items():
        batch = []
        while len(batch) < count:
            word = tuple(rng.choice(LETTERS) for _ in range(rng.randint(*lengths)))
            if word not in seen:
                seen.add(word)
                batch.append(word)
        yield split, batch


def write(task, split, rows):
    with open(os.path.join(HERE, task, f"{split}.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def spaced(word):
    return " " + " ".join(word)


def main():
    sizes = {"train": 4000, "valid": 200, "test": 200}
    for split, batch in words(random.Random(0), sizes, (3, 6)):
        write("reverse", split, [{"prompt": "reverse:" + spaced(w) + "\n=", "completion": spaced(w[::-1])} for w in batch])
    for split, batch in words(random.Random(0), {"train": 1000, "test": 100}, (3, 5)):
        write("sort", split, [{"prompt": "sort:" + spaced(w) + "\n=", "completion": spaced(sorted(w))} for w in batch])
    codes = {w for _, batch in words(random.Random(0), {"train": 16}, (4, 4)) for w in batch}
    rows = [{"prompt": "code:" + spaced(c) + "\nlabel:", "completion": " " + LABELS[(i * 5) % 6]} for i, c in enumerate(sorted(codes))]
    write("labels", "train", rows)


if __name__ == "__main__":
    main()
