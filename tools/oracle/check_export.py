#!/usr/bin/env python3
"""Load LoRA adapters trained and exported by Tandem into PEFT itself, and store PEFT's logits.

`worker/tests/train_export.rs` trains a LoRA job per model and, with TANDEM_WRITE_FIXTURES=1,
writes the export (`adapter_config.json`, `adapter_model.safetensors`) to
`fixtures/<model>/train/export/`. For each model whose export exists, this script loads the base
model (f32, eager attention) and the export with `PeftModel.from_pretrained`, and asserts, strictly:

- PEFT emits no warning while loading (e.g. "Found missing adapter keys");
- the set of PEFT's lora_A / lora_B parameters equals the set of tensors in the file, and each one
  holds exactly the file's values (PEFT silently ignores unexpected keys, so this is the real check);
- the modules PEFT wrapped are exactly the ones the config targets, recomputed here from
  `target_modules` independently of PEFT (list entry = the name or a `.`-suffix of it;
  `"all-linear"` = every nn.Linear but `lm_head`), and each has the config's rank and scaling;
- with the adapter disabled the model gives the base logits again.

Then it writes `train/export/peft_logits.json` (`{"prompts": [[ids...], ...]}`: the first 3
sequences of `train/train.json`, truncated to 10 tokens; for an MoE model, skipping any whose
routing with the adapter has a near-tie, 2nd-3rd probability gap < 1e-3) and
`train/export/peft_logits.safetensors` (`logits.{i}`: PEFT with the adapter, `base_logits.{i}`: the
base model; f32 `[len, vocab]`).

One phase per transformers major version, like the other scripts (llama is a transformers-5
model, mixtral a transformers-4 one with per-expert modules):

    tools/oracle/.venv-tf4/bin/python tools/oracle/check_export.py   # mixtral
    tools/oracle/.venv/bin/python     tools/oracle/check_export.py   # llama

Seeded (nothing random is drawn), offline, byte-identical on rerun.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings

if os.environ.get("PYTHONHASHSEED") != "0":  # same as make_fixtures.py (PEFT serialises sets)
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:])
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import make_fixtures as mf  # noqa: E402  (helpers only; also sets threads/determinism)

TF_MAJOR = mf.TF_MAJOR
FIX = mf.FIX
PROMPTS = 3  # first sequences of train.json
PROMPT_LEN = 10  # truncated to this many tokens
MIN_ROUTER_GAP = 1e-3  # 2nd vs 3rd routing probability with the adapter (k = 2), every token/layer
PREFIX = "base_model.model."

# model -> transformers class and the major version whose module layout the export uses
MODELS = {
    "llama": {"cls": "LlamaForCausalLM", "phase": 5},
    "mixtral": {"cls": "MixtralForCausalLM", "phase": 4, "top_k": 2},
}


def export_dir(model_name):
    return os.path.join(FIX, model_name, "train", "export")


def load_base(model_name):
    m = mf.load_base(getattr(transformers, MODELS[model_name]["cls"]), os.path.join(FIX, model_name))
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def candidate_prompts(model_name):
    """The sequences of train.json in order, truncated to PROMPT_LEN tokens."""
    with open(os.path.join(FIX, model_name, "train", "train.json")) as f:
        seqs = json.load(f)["sequences"]
    return [s["tokens"][:PROMPT_LEN] for s in seqs]


@torch.no_grad()
def logits_of(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0].float().contiguous()


def expected_targets(base, config):
    """Module names the config targets, recomputed from `target_modules` without PEFT."""
    tm = config["target_modules"]
    assert not config.get("target_parameters"), "target_parameters: not what Tandem exports"
    assert config.get("layers_to_transform") is None and not config.get("exclude_modules")
    out = set()
    for name, mod in base.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        if tm == "all-linear":
            out.add(name)
        else:
            assert isinstance(tm, list), f"unexpected target_modules {tm!r}"
            if any(name == t or name.endswith("." + t) for t in tm):
                out.add(name)
    return out


class RouterProbe:
    """Smallest gap between the k-th and (k+1)-th routing probability over all tokens and MoE
    layers; hooks the router module (the PEFT wrapper, so its LoRA delta is included)."""

    def __init__(self, model, top_k):
        self.top_k, self.min_gap, self.handles = top_k, float("inf"), []
        for name, mod in model.named_modules():
            if name.endswith("block_sparse_moe.gate"):
                self.handles.append(mod.register_forward_hook(self._hook))
        assert self.handles

    def _hook(self, mod, inp, out):
        s = torch.softmax(out.float(), dim=-1).sort(dim=-1, descending=True).values
        self.min_gap = min(self.min_gap, float((s[..., self.top_k - 1] - s[..., self.top_k]).min()))

    def close(self):
        for h in self.handles:
            h.remove()


def check_model(model_name):
    d = export_dir(model_name)
    with open(os.path.join(d, "adapter_config.json")) as f:
        config = json.load(f)
    file_tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
    base = load_base(model_name)
    want = expected_targets(base, config)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, d)
    model.eval()
    # API deprecations (transformers 5 warns that PEFT calls `is_gradient_checkpointing`) say
    # nothing about the adapter; any other warning (missing keys, unmatched patterns, ...) fails.
    api = (DeprecationWarning, FutureWarning)
    for w in caught:
        if issubclass(w.category, api):
            print(f"  ({model_name}: ignored {w.category.__name__}: {w.message})")
    bad = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, api)]
    assert not bad, f"{model_name}: PEFT warned while loading: {bad}"

    # Every tensor of the file is a parameter of the model, with the file's values, and nothing else.
    params = {}
    for n, p in model.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            key = n.replace(".default.weight", ".weight")
            assert key != n, n
            params[key] = p
    missing, unexpected = sorted(set(params) - set(file_tensors)), sorted(set(file_tensors) - set(params))
    assert not missing and not unexpected, f"{model_name}: missing {missing[:4]}, unexpected {unexpected[:4]}"
    for k, t in file_tensors.items():
        assert params[k].dtype == torch.float32 and torch.equal(params[k].data, t), f"{model_name}: {k}"

    # The wrapped modules are exactly the targeted ones, with the config's rank and scaling.
    wrapped = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            assert name.startswith(PREFIX), name
            wrapped[name[len(PREFIX):]] = mod
    in_file = {k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in file_tensors}
    assert set(wrapped) == want == in_file, (
        f"{model_name}: wrapped vs targeted vs in file: {sorted(set(wrapped) ^ want)[:4]} "
        f"{sorted(want ^ in_file)[:4]}")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
    for name, mod in wrapped.items():
        assert mod.r["default"] == r, (name, mod.r)
        assert abs(mod.scaling["default"] - scaling) < 1e-12, (name, mod.scaling, scaling)

    # The first PROMPTS candidates; for an MoE model only those whose routing (adapter active) has
    # no near-tie, so that a correct f32 runtime cannot pick other experts than PEFT did.
    ids, peft_logits, skipped, min_gap = [], [], [], float("inf")
    for i, p in enumerate(candidate_prompts(model_name)):
        if len(ids) == PROMPTS:
            break
        probe = RouterProbe(model, MODELS[model_name]["top_k"]) if "top_k" in MODELS[model_name] else None
        x = logits_of(model, p)
        if probe:
            probe.close()
            if probe.min_gap < MIN_ROUTER_GAP:
                skipped.append(f"sequence {i} (routing gap {probe.min_gap:.1e})")
                continue
            min_gap = min(min_gap, probe.min_gap)
        ids.append(p)
        peft_logits.append(x)
    assert len(ids) == PROMPTS, f"{model_name}: only {len(ids)} usable prompts"
    with model.disable_adapter():
        base_logits = [logits_of(model, p) for p in ids]
    fresh = load_base(model_name)  # the adapter-free model, never touched by PEFT
    for p, b in zip(ids, base_logits):
        assert torch.equal(logits_of(fresh, p), b), f"{model_name}: the disabled adapter changes the logits"
    effect = min(float((a - b).abs().max() / a.abs().max()) for a, b in zip(peft_logits, base_logits))

    save_file({**{f"logits.{i}": x for i, x in enumerate(peft_logits)},
               **{f"base_logits.{i}": x for i, x in enumerate(base_logits)}},
              os.path.join(d, "peft_logits.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "peft_logits.json"), "w") as f:
        f.write('{"prompts": [\n' + ",\n".join("  " + json.dumps(p) for p in ids) + "\n]}\n")

    kinds = sorted({n.split(".")[-1] for n in wrapped})
    gap = f", min routing gap {min_gap:.2e}" if min_gap < float("inf") else ""
    if skipped:
        gap += f"; skipped near-tie {', '.join(skipped)}"
    print(f"{model_name}: PEFT wrapped {len(wrapped)} modules ({', '.join(kinds)}), loaded all "
          f"{len(file_tensors)} tensors, r {r} scaling {scaling:.4g}; adapter moves the logits by >= "
          f"{effect:.2e} of max |logit|{gap}")
    for f in sorted(os.listdir(d)):
        print(f"  {os.path.relpath(os.path.join(d, f), FIX)} {os.path.getsize(os.path.join(d, f))}")


def main():
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"peft {__import__('peft').__version__} -> phase tf{TF_MAJOR}")
    done = 0
    for m, spec in MODELS.items():
        if spec["phase"] != TF_MAJOR:
            print(f"{m}: skipped (its export uses the transformers {spec['phase']} module layout)")
            continue
        if not os.path.exists(os.path.join(export_dir(m), "adapter_model.safetensors")):
            print(f"{m}: no export (run TANDEM_WRITE_FIXTURES=1 cargo test -p tandem-worker --test "
                  "train_export first)")
            continue
        check_model(m)
        done += 1
    if not done:
        raise SystemExit("nothing checked")


if __name__ == "__main__":
    sys.exit(main())
