"""The peer of `tandem bench serve`: the same workload with Hugging Face transformers + PEFT on
the CPU, all requests in one batch with PEFT's mixed-adapter inference (`adapter_names=`).

    python bench/peft_serve.py --model DIR --workload workload.jsonl [--dtype bfloat16] [--adapter DIR]...

Prints one JSON line: {"seconds": ..., "tokens": ...}. Run from `tandem bench serve
--peer-python tools/oracle/.venv/bin/python`, which writes the model, adapters and workload.
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--adapter", action="append", default=[])
    p.add_argument("--batch", type=int, default=64, help="requests per generate() call")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    names = []
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter[0], adapter_name="0")
        names.append("0")
        for i, path in enumerate(args.adapter[1:], start=1):
            model.load_adapter(path, adapter_name=str(i))
            names.append(str(i))
    model.eval()
    reqs = [json.loads(line) for line in open(args.workload) if line.strip()]

    start = time.perf_counter()
    tokens = 0
    with torch.inference_mode():
        for b in range(0, len(reqs), args.batch):
            batch = reqs[b : b + args.batch]
            ids = torch.tensor([r["prompt_ids"] for r in batch])  # equal lengths: no padding
            n = batch[0]["max_tokens"]
            kwargs = {}
            if names:
                kwargs["adapter_names"] = [str(r["adapter"]) for r in batch]
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                **kwargs,
            )
            tokens += out.numel()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "tokens": tokens, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
