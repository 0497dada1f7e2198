#!/usr/bin/env python3
"""Bytes one rank of a tensor-parallel group sends per token at each place in the model,
measured (`tandem tp-rank` processes over TCP on loopback, their byte counters) next to the
volume the algorithm implies. Prints a Markdown table (docs/benchmarks.md).

Usage: python3 bench/tp_traffic.py [--bin target/release/tandem] [--dir /tmp/tp-traffic]
"""
import argparse
import json
import os
import socket
import subprocess

RUNS = [("small", "intermediate"), ("tiny-moe", "intermediate"), ("tiny-moe", "experts")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def certificates(binary, folder):
    """A cluster CA and worker certificates rank0..rank3: the ranks talk under TLS, as deployed."""
    certs = os.path.join(folder, "certs")
    if not os.path.exists(os.path.join(certs, "ca.pem")):
        subprocess.run([binary, "certs", "--dir", certs, "init"], check=True, stdout=subprocess.DEVNULL)
    for r in range(4):
        if not os.path.exists(os.path.join(certs, f"rank{r}.pem")):
            subprocess.run([binary, "certs", "--dir", certs, "issue", "--role", "worker", "--name", f"rank{r}"],
                           check=True, stdout=subprocess.DEVNULL)
    return certs


def group(binary, model, world, moe_split, certs):
    peers = ",".join(f"127.0.0.1:{free_port()}" for _ in range(world))
    procs = [
        subprocess.Popen([binary, "tp-rank", "--model", model, "--rank", str(r), "--peers", peers,
                          "--moe-split", moe_split, "--certs", certs], stdout=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    outs = [json.loads(p.communicate()[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    return outs


def ring_all_reduce(w, floats):
    return 2 * (w - 1) / w * 4 * floats


def figures(out):
    """Per-unit bytes of one rank's JSON, each with its theoretical volume."""
    w, h, layers, vocab = out["world"], out["hidden_size"], out["layers"], out["vocab_size"]
    b = out["bytes"]
    train = out["train_tokens"]
    infer = out["tokens"] - train
    rows = out["logit_rows"]
    rows_train = train - len(out["losses"])  # every prompt token but each sequence's last
    per = lambda site, n: b.get(site, 0) / n
    f = {
        "embedding / token": (per("embedding", out["tokens"]), ring_all_reduce(w, h)),
        "attention (after o) / token / layer": (per("attention", out["tokens"] * layers), ring_all_reduce(w, h)),
        "MLP (after down) / token / layer": (per("mlp", out["tokens"] * layers), ring_all_reduce(w, h)),
        "logits / row": (per("logits", rows), (w - 1) / w * 4 * vocab),
        # The loss: per-row maxima (all-gather of 1 float), sums and target logits (all-reduce of
        # 2), then the all-reduce of the hidden states' gradient over every training token.
        "loss / training token": (per("loss", train),
                                  (rows_train * ((w - 1) * 4 + ring_all_reduce(w, 2)) + train * ring_all_reduce(w, h)) / train),
        "attention backward / training token / layer": (per("attentionbackward", train * layers), ring_all_reduce(w, h)),
        "MLP backward / training token / layer": (per("mlpbackward", train * layers), ring_all_reduce(w, h)),
        # One all-reduce of the adapters' whole gradients (under expert parallelism the ranks
        # first all-gather which ESFT experts each holds: "gradientlayout", not counted here).
        "adapter gradients / step": (b.get("gradients", 0),
                                     ring_all_reduce(w, sum(len(g) for g in out["gradients"].values()))),
    }
    if out["top_k"] and "experts" in b:
        k = out["top_k"]
        # Each rank routes 1/w of the tokens; with uniform routing (w-1)/w of its k pairs leave
        # it with h + 2 floats (state, expert, adapter slot), and it returns h floats for as
        # many pairs from the others.
        expect = k * (w - 1) / w / w * 4 * (2 * h + 2)
        f["expert all-to-all / token / layer (uniform routing)"] = (per("experts", out["tokens"] * layers), expect)
        f["expert all-to-all backward / training token / layer"] = (per("expertsbackward", train * layers),
                                                                   k * (w - 1) / w / w * 4 * 2 * h)
    return f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "tandem"))
    ap.add_argument("--dir", default="/tmp/tp-traffic")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    certs = certificates(args.bin, args.dir)
    for preset, moe_split in RUNS:
        model = os.path.join(args.dir, preset)
        if not os.path.exists(os.path.join(model, "config.json")):
            subprocess.run([args.bin, "init-model", "--preset", preset, "--out", model], check=True,
                           stdout=subprocess.DEVNULL)
        tables = {w: figures(group(args.bin, model, w, moe_split, certs)[0]) for w in (2, 4)}
        print(f"\n`{preset}`, experts split: {moe_split} (rank 0's bytes; theory in brackets)\n")
        print("| per | degree 2 | degree 4 |")
        print("| --- | --- | --- |")
        for name in tables[2]:
            cells = []
            for w in (2, 4):
                got, want = tables[w][name]
                cells.append(f"{got:.0f} B" + (f" ({want:.0f})" if want is not None else ""))
            print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
