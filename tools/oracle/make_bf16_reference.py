"""Reference logits for a bf16 checkpoint served with bf16 weights on AMX tiles.

Where the CPU has AMX tiles, Tandem keeps a dense model's bf16 checkpoint in bf16 and multiplies
each base linear layer (and the tied LM head) on the tiles: the weights as stored, the layer's
input rounded to bf16, every sum in f32. Served adapters are held in bf16 too, their deltas
computed in f32 from the f32 input. Everything else (norms, attention, activations) stays f32.
This script makes torch compute exactly that: the model in f32 (the bf16 weights upcast, which is
exact) with a forward pre-hook on every base `nn.Linear` that rounds its input to bf16, and the
adapters' `lora_A` / `lora_B` weights rounded to bf16. PEFT's LoRA layers call their base layer
with the unrounded input and their own `lora_A` / `lora_B` with it too, as Tandem does.

Training runs the same products backward: the input gradient of a base layer is its output
gradient rounded to bf16 times the weight, in f32. Here that is a backward pre-hook on every base
`nn.Linear` rounding its output gradient, with the forward rounding made straight-through (a
plain cast would round the gradient passing back through it as well). A job in training keeps
f32 adapter weights, so the gradients' reference leaves them as they are.

For each fixture named on the command line (default: qwen2, the bf16 one) it reads the prompts
and adapters of `reference.json` and writes `reference_bf16_inputs.json` (greedy continuations)
and `reference_bf16_inputs.safetensors` (logits) beside them, and for the jobs and sequences of
`train/train.json` it writes `train/grads_bf16_inputs.safetensors` (losses and gradients, keyed as
`grads.safetensors`). `worker/tests/oracle.rs` and `worker/tests/train_oracle.rs` check the tile
path against them.

    tools/oracle/.venv/bin/python tools/oracle/make_bf16_reference.py
"""

from __future__ import annotations

import json
import os
import sys

if os.environ.get("PYTHONHASHSEED") != "0":  # make_train_fixtures.py re-executes itself without it
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:])

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (requests as the f32 references make them; threads, determinism)
import make_train_fixtures as mtf  # noqa: E402  (the training jobs, as the f32 gradients use them)

FIX = mf.FIX


def bf16(t):
    return t.to(torch.bfloat16).to(torch.float32)


def round_inputs_to_bf16(model):
    """Rounds the input of every base linear layer to bf16 (LoRA's own layers are left exact), and
    the output gradient it multiplies backward; the rounding of the input passes gradients
    through unchanged."""

    def forward(_mod, args):
        x = args[0]
        return (x + (bf16(x) - x).detach(),) + tuple(args[1:])

    def backward(_mod, grad_output):
        return (bf16(grad_output[0]),) + tuple(grad_output[1:])

    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lora_" not in name:
            assert mod.weight.dtype == torch.float32
            mod.register_forward_pre_hook(forward)
            mod.register_full_backward_pre_hook(backward)
            n += 1
    return n


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
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if "lora_" in pname:
                        p.copy_(bf16(p))
            hooked = round_inputs_to_bf16(model)
            # Prompt logits and greedy continuation (generate() cross-checked by a no-cache loop).
            lg, greedy, margin, _ = mf.run_request(model, r["prompt_ids"])
            assert margin >= mf.MIN_LOGIT_MARGIN, f"{name} request {i}: greedy margin {margin}"
            print(f"  [{name}] req {i} adapter={r['adapter']}: {hooked} linear layers rounded, "
                  f"greedy-margin={margin:.4f}, greedy {'==' if greedy == r['greedy'] else '!='} f32's")
            out_requests.append({"adapter": r["adapter"], "prompt_ids": r["prompt_ids"], "greedy": greedy})
            logits[f"logits.{i}"] = lg.contiguous()
        with open(os.path.join(out_dir, "reference_bf16_inputs.json"), "w") as f:
            json.dump({"requests": out_requests}, f, indent=2)
            f.write("\n")
        save_file(logits, os.path.join(out_dir, "reference_bf16_inputs.safetensors"), metadata={"format": "pt"})


def train_reference(name):
    """Every training job's loss and gradients with the tile numerics, in `grads.safetensors`'s
    keys; also how far they are from the stored f32 ones."""
    jobs = mtf.read_train(name)
    losses, tensors = [], {}
    for job_name, job in jobs.items():
        model, slots = mtf.build_job_model(name, job["entry"])
        round_inputs_to_bf16(model)
        loss = mtf.job_loss(model, job["seqs"])
        loss.backward()
        worst = 0.0
        for k, (p, ix) in slots.items():
            g = p.grad[ix].detach().float().contiguous()
            want = job["grads"][k]
            worst = max(worst, ((g - want).abs().max() / want.abs().max()).item())
            tensors[f"{job_name}/{k}"] = g
        print(f"  [{name}] train job {job_name}: loss {loss.item():.6f} (f32: {job['loss']:.6f}), "
              f"gradients differ from f32's by up to {worst:.2e} of their largest entry")
        losses.append(loss.item())
    tensors["losses"] = torch.tensor(losses, dtype=torch.float32)
    save_file(tensors, os.path.join(FIX, name, "train", "grads_bf16_inputs.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    for fixture in sys.argv[1:] or ["qwen2"]:
        main([fixture])
        train_reference(fixture)
