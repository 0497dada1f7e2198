"""Reference logits for a bf16 checkpoint served with bf16 weights on AMX tiles.

Where the CPU has AMX tiles, Tandem keeps a dense model's bf16 checkpoint in bf16 and multiplies
each base linear layer (and the tied LM head) on the tiles: the weights as stored, the layer's
input rounded to bf16, every sum in f32. Everything else (norms, attention, LoRA deltas,
activations) stays f32. This script makes torch compute exactly that: the model in f32 (the bf16
weights upcast, which is exact) with a forward pre-hook on every base `nn.Linear` that rounds its
input to bf16. PEFT's LoRA layers call their base layer with the unrounded input and their own
`lora_A` / `lora_B` with it too, as Tandem does.

For each fixture named on the command line (default: qwen2, the bf16 one) it reads the prompts
and adapters of `reference.json` and writes `reference_bf16_inputs.json` (greedy continuations)
and `reference_bf16_inputs.safetensors` (logits) beside them; `worker/tests/oracle.rs` checks the
tile path against them.

    tools/oracle/.venv/bin/python tools/oracle/make_bf16_reference.py
"""

from __future__ import annotations

import json
import os
import sys

import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")
GREEDY_TOKENS = 16
# Greedy continuations must not hinge on a near-tie that summation order could flip.
MIN_LOGIT_MARGIN = 1e-3

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)


def round_inputs_to_bf16(model):
    """Rounds the input of every base linear layer to bf16 (LoRA's own layers are left exact)."""

    def hook(_mod, args):
        return (args[0].to(torch.bfloat16).to(torch.float32),) + tuple(args[1:])

    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lora_" not in name:
            assert mod.weight.dtype == torch.float32
            mod.register_forward_pre_hook(hook)
            n += 1
    return n


@torch.no_grad()
def reference(model, prompt):
    ids = torch.tensor([prompt])
    logits = model(input_ids=ids).logits[0].float().clone()
    cur, greedy, margin = ids, [], float("inf")
    for _ in range(GREEDY_TOKENS):
        last = model(input_ids=cur).logits[0, -1].float()
        top = last.topk(2).values
        margin = min(margin, (top[0] - top[1]).item())
        nxt = int(last.argmax())
        greedy.append(nxt)
        cur = torch.cat([cur, torch.tensor([[nxt]])], dim=1)
    return logits, greedy, margin


def main(names):
    for name in names:
        out_dir = os.path.join(FIX, name)
        with open(os.path.join(out_dir, "reference.json")) as f:
            requests = json.load(f)["requests"]
        cfg = transformers.AutoConfig.from_pretrained(out_dir)
        assert cfg.dtype == torch.bfloat16, f"{name} is not a bf16 checkpoint"
        out_requests, logits = [], {}
        for i, r in enumerate(requests):
            base = transformers.AutoModelForCausalLM.from_pretrained(
                out_dir, attn_implementation="eager", dtype=torch.float32
            )
            model = base if r["adapter"] is None else PeftModel.from_pretrained(
                base, os.path.join(out_dir, "adapters", r["adapter"])
            )
            model.eval()
            hooked = round_inputs_to_bf16(model)
            lg, greedy, margin = reference(model, r["prompt_ids"])
            assert margin >= MIN_LOGIT_MARGIN, f"{name} request {i}: greedy margin {margin}"
            print(f"  [{name}] req {i} adapter={r['adapter']}: {hooked} linear layers rounded, "
                  f"greedy-margin={margin:.4f}, greedy {'==' if greedy == r['greedy'] else '!='} f32's")
            out_requests.append({"adapter": r["adapter"], "prompt_ids": r["prompt_ids"], "greedy": greedy})
            logits[f"logits.{i}"] = lg.contiguous()
        with open(os.path.join(out_dir, "reference_bf16_inputs.json"), "w") as f:
            json.dump({"requests": out_requests}, f, indent=2)
            f.write("\n")
        save_file(logits, os.path.join(out_dir, "reference_bf16_inputs.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main(sys.argv[1:] or ["qwen2"])
