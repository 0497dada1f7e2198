"""The peer of `tandem bench finetune`: LoRA training with Hugging Face transformers + PEFT +
torch on the CPU, on the same model, batch shape, rank and optimizer.

    python bench/peft_finetune.py --model DIR [--batch 4 --seq-len 256 --steps 3 --rank 16]

Random token ids (seeded), loss on every next token (`labels=input_ids`), AdamW. One untimed
warm-up step, then `--steps` timed ones. Prints one JSON line: {"seconds", "tokens", "steps",
"peak_rss_bytes", "torch_threads"}. Run from `tandem bench finetune --peer-python PY`.
"""

import argparse
import json
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    args = p.parse_args()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def step():
        ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up: allocations, thread pools
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - start
    print(json.dumps({
        "seconds": seconds,
        "tokens": args.steps * args.batch * args.seq_len,
        "steps": args.steps,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
