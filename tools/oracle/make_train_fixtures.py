#!/usr/bin/env python3
"""Training-gradient fixtures for Tandem's backward pass, from torch autograd (transformers + PEFT).

For the fixture models built by make_fixtures.py (llama, qwen2, mixtral, qwen2_moe) this writes
`fixtures/<model>/train/`: a set of training jobs (one adapter each: PEFT LoRA or Tandem ESFT),
2-3 labelled sequences per job, every job's loss and the gradient of the summed loss w.r.t. every
trainable adapter tensor. See FIXTURES.md, section "Training gradients (`train/`)".

Two phases, one per transformers major version (run make_fixtures.py first, then, in this order):

    tools/oracle/.venv-tf4/bin/python tools/oracle/make_train_fixtures.py  # tf4: mixtral, and
                                                                            # qwen2_moe's router job
    tools/oracle/.venv/bin/python     tools/oracle/make_train_fixtures.py  # tf5: llama, qwen2,
                                                                            # qwen2_moe (merges)

Everything is seeded: rerunning both phases reproduces byte-identical files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys

if os.environ.get("PYTHONHASHSEED") != "0":  # same as make_fixtures.py (PEFT serialises sets)
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:])
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.nn.utils.parametrize as parametrize  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import make_fixtures as mf  # noqa: E402  (helpers only; also sets threads/determinism)

TF_MAJOR = mf.TF_MAJOR
FIX = mf.FIX
MIN_ROUTER_GAP = 1e-3  # 2nd vs 3rd routing probability, every token and MoE layer (k = 2)
LEN_MIN, LEN_MAX = 4, 20
IGNORE = -100
FD_STEP = 1e-5  # central finite difference step (float64)
FD_ENTRIES = 3  # scalar entries checked per job
TOL_FD_F64 = 1e-7  # float64 autograd vs float64 finite difference (validates the f64 set-up)
TOL_FD_F32 = 1e-4  # stored f32 autograd vs float64 finite difference (relative)
TOL_F32_F64 = 1e-4  # stored f32 gradient vs f64 gradient, max|diff| / max|g64| per tensor
TOL_XCHECK = 1e-5  # qwen2_moe tf4-made job recomputed under transformers 5

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

# model -> settings. "train_loras": training-only PEFT adapters written to train/adapters/<name>
# (made in the phase given; LoraConfig kwargs). Jobs made by the tf4 phase are marked by phase 4.
MODELS = {
    "mixtral": {"cls": "MixtralForCausalLM", "phase": 4, "seed": 51, "top_k": 2, "arch": "mixtral",
                "train_loras": [("router_attn_r2", 4, dict(
                    r=2, lora_alpha=6, target_modules=["gate", "o_proj", "w1"]))]},
    "llama": {"cls": "LlamaForCausalLM", "phase": 5, "seed": 11},
    "qwen2": {"cls": "Qwen2ForCausalLM", "phase": 5, "seed": 41},
    # transformers 5's Qwen2-MoE router (Qwen2MoeTopKRouter) is not an nn.Linear, so PEFT refuses to
    # target it; transformers 4's is, so this adapter and its job are made in the tf4 phase (the tf5
    # phase recomputes that job under transformers 5 as a cross-check).
    "qwen2_moe": {"cls": "Qwen2MoeForCausalLM", "phase": 5, "seed": 61, "top_k": 2, "arch": "qwen2_moe",
                  "train_loras": [("router_sgate_q_r4", 4, dict(
                      r=4, lora_alpha=4, target_modules=["gate", "shared_expert_gate", "q_proj"]))]},
}


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def load_base(model_name):
    cls = getattr(transformers, MODELS[model_name]["cls"])
    d = os.path.join(FIX, model_name)
    kw = {"attn_implementation": "eager", **mf.dtype_kw(torch.float32)}
    if TF_MAJOR >= 5 and "arch" in MODELS[model_name]:
        kw["experts_implementation"] = "eager"  # plain per-expert loop (default would be grouped_mm)
    if TF_MAJOR < 5 and model_name == "qwen2_moe":
        # config.json is transformers-5 spelling (rope_parameters): transformers 4 would fall back to
        # rope_theta 1e4. Give it the stored theta explicitly.
        with open(os.path.join(d, "config.json")) as f:
            raw = json.load(f)
        cfg = transformers.AutoConfig.from_pretrained(d)
        cfg.rope_theta = raw["rope_parameters"]["rope_theta"]
        kw["config"] = cfg
    m = cls.from_pretrained(d, **kw)
    m.eval()  # no dropout / router jitter; autograd still works
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def discover_jobs(model_name):
    """Existing adapters (minus target_parameters ones), ESFT adapters, then training-only ones."""
    d = os.path.join(FIX, model_name)
    spec = MODELS[model_name]
    jobs, excluded = [], []
    ad = os.path.join(d, "adapters")
    for name in sorted(os.listdir(ad)) if os.path.isdir(ad) else []:
        with open(os.path.join(ad, name, "adapter_config.json")) as f:
            cfg = json.load(f)
        if cfg.get("target_parameters"):
            excluded.append(name)
            continue
        jobs.append({"name": name, "kind": "lora", "path": f"adapters/{name}", "phase": spec["phase"]})
    ed = os.path.join(d, "esft")
    for name in sorted(os.listdir(ed)) if os.path.isdir(ed) else []:
        jobs.append({"name": name, "kind": "esft", "path": f"esft/{name}", "phase": spec["phase"]})
    for name, phase, _ in spec.get("train_loras", []):
        jobs.append({"name": name, "kind": "lora", "path": f"train/adapters/{name}", "phase": phase})
    names = [j["name"] for j in jobs]
    assert len(set(names)) == len(names), names
    return jobs, excluded


def lora_key(param_name):
    """PeftModel parameter name -> key in adapter_model.safetensors."""
    k, n = re.subn(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", param_name)
    assert n == 1, param_name
    return k


def build_job_model(model_name, job):
    """Model with only this job's adapter; returns (model, slots) where slots maps each output key
    to (parameter, index) such that parameter[index] is that tensor (views into fused tensors)."""
    d = os.path.join(FIX, model_name)
    base = load_base(model_name)
    if job["kind"] == "lora":
        ad = os.path.join(d, job["path"])
        model = PeftModel.from_pretrained(base, ad, is_trainable=True)
        model.eval()
        return model, lora_slots(model, ad)
    tensors = load_file(os.path.join(d, job["path"], "esft_model.safetensors"))
    mf.apply_esft(base, MODELS[model_name]["arch"], tensors)
    return base, esft_slots(base, tensors)


def lora_slots(model, ad):
    slots = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            slots[lora_key(n)] = (p, ())
    want = set(load_file(os.path.join(ad, "adapter_model.safetensors")))
    assert set(slots) == want, (sorted(set(slots) ^ want))[:6]
    return dict(sorted(slots.items()))


def esft_slots(model, tensors):
    sd = dict(model.named_parameters())
    slots = {}
    for key, val in tensors.items():
        if key in sd:  # transformers 4 per-expert modules
            slots[key] = (sd[key], ())
            continue
        parts = key.split(".")  # transformers 5 fused: model.layers.L.mlp.experts.{gate_up_proj,down_proj}
        layer, e, proj = int(parts[2]), int(parts[-3]), parts[-2]
        ex = f"model.layers.{layer}.mlp.experts"
        if proj in ("w1", "gate_proj"):
            I = val.shape[0]
            slots[key] = (sd[f"{ex}.gate_up_proj"], (e, slice(0, I)))
        elif proj in ("w3", "up_proj"):
            I = val.shape[0]
            slots[key] = (sd[f"{ex}.gate_up_proj"], (e, slice(I, 2 * I)))
        else:
            slots[key] = (sd[f"{ex}.down_proj"], (e,))
    for p, _ in slots.values():
        p.requires_grad_(True)
    for key, (p, ix) in slots.items():  # the replaced values really are what the model uses
        assert torch.equal(p.data[ix], tensors[key].to(p.dtype)), key
    return dict(sorted(slots.items()))


def slot_param_names(model, slots):
    """Parameter name of each slot (to find the parameters again after model.double())."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {k: by_id[id(p)] for k, (p, _) in slots.items()}


# ----------------------------------------------------------------------------------------------
# routing probe / sequences
# ----------------------------------------------------------------------------------------------
class RouterProbe:
    """Smallest gap between the k-th and (k+1)-th routing probability, all tokens and MoE layers.
    Hooks the router module itself (a PEFT LoRA wrapper when the router is targeted, so the LoRA
    delta is included): tf4 nn.Linear `block_sparse_moe.gate` / `mlp.gate`, tf5 `*TopKRouter`."""

    def __init__(self, model, top_k):
        self.top_k, self.min_gap, self.handles, self.n = top_k, float("inf"), [], 0
        for name, mod in model.named_modules():
            if name.endswith(("block_sparse_moe.gate", "mlp.gate")):
                self.handles.append(mod.register_forward_hook(self._hook))
        assert self.handles

    def _hook(self, mod, inp, out):
        logits = (out[0] if isinstance(out, tuple) else out).detach()
        probs = torch.softmax(logits.double().reshape(-1, logits.shape[-1]), dim=-1)
        s = probs.sort(dim=-1, descending=True).values
        self.min_gap = min(self.min_gap, (s[:, self.top_k - 1] - s[:, self.top_k]).min().item())
        self.n += 1

    def close(self):
        for h in self.handles:
            h.remove()


def lengths_for(model_name, n):
    g = torch.Generator().manual_seed(sum(map(ord, model_name)) + 7)
    perm = (torch.randperm(LEN_MAX - LEN_MIN + 1, generator=g) + LEN_MIN).tolist()
    assert n <= len(perm)
    return perm[:n]


def seq_counts(n_jobs):
    return [3 if j % 2 == 0 else 2 for j in range(n_jobs)]


def make_targets(tokens, prefix):
    """targets[t] = tokens[t+1] for prefix <= t < len-1; IGNORE for t < prefix and t = len-1."""
    n = len(tokens)
    return [tokens[t + 1] if prefix <= t < n - 1 else IGNORE for t in range(n)]


@torch.no_grad()
def draw_sequence(model, vocab, length, seed, top_k):
    g = torch.Generator().manual_seed(seed)
    prefix = int(torch.randint(0, length // 2 + 1, (1,), generator=g))
    for attempt in range(500):
        g = torch.Generator().manual_seed(seed * 1000 + attempt)
        tokens = torch.randint(0, vocab, (length,), generator=g).tolist()
        gap = float("inf")
        if top_k:
            probe = RouterProbe(model, top_k)
            model(input_ids=torch.tensor([tokens]))
            probe.close()
            gap = probe.min_gap
            if gap < MIN_ROUTER_GAP:
                continue
        return tokens, make_targets(tokens, prefix), gap, attempt
    raise RuntimeError("no sequence without routing near-ties found")


def job_loss(model, seqs):
    """Sum of per-token cross entropy over all labelled positions of the job / their count."""
    total, count = 0.0, 0
    for s in seqs:
        logits = model(input_ids=torch.tensor([s["tokens"]])).logits[0]
        tgt = torch.tensor(s["targets"])
        total = total + F.cross_entropy(logits, tgt, ignore_index=IGNORE, reduction="sum")
        count += int((tgt != IGNORE).sum())
    return total / count


# ----------------------------------------------------------------------------------------------
# float64 numerics for the finite-difference check
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def f64_numerics():
    """transformers upcasts to float32 on purpose in places (RMSNorm `.to(torch.float32)`, softmax
    `dtype=torch.float`, `.float()`); in a float64 model those would round to f32 and drown a finite
    difference in noise. Inside this context every conversion to float32 (`.to`, `.float()`,
    softmax's dtype) gives float64 instead."""
    orig_to, orig_float, orig_softmax = torch.Tensor.to, torch.Tensor.float, F.softmax

    def to(self, *args, **kw):  # any request for float32 gives float64
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        if kw.get("dtype") is torch.float32:
            kw["dtype"] = torch.float64
        return orig_to(self, *args, **kw)

    def flt(self, *args, **kw):
        return orig_to(self, torch.float64)

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        if dtype is torch.float32:
            dtype = torch.float64
        return orig_softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    torch.Tensor.to, torch.Tensor.float, F.softmax = to, flt, softmax
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.float, F.softmax = orig_to, orig_float, orig_softmax


def pick_fd_entries(job, grads, seed):
    """3 (key, flat index) pairs: tensors of different kinds, the largest-|g| entry in each."""
    g = torch.Generator().manual_seed(seed)
    keys = [k for k in grads if grads[k].abs().max() > 0]
    if job["kind"] == "lora":
        groups = [[k for k in keys if ".lora_A." in k], [k for k in keys if ".lora_B." in k]]
        router = [k for k in keys if re.search(r"\.(gate|shared_expert_gate)\.lora_", k)]
        groups.append(router if router else keys)
    else:
        groups = [[k for k in keys if re.search(pat, k)]
                  for pat in (r"\.(w1|gate_proj)\.", r"\.(w3|up_proj)\.", r"\.(w2|down_proj)\.")]
    out = []
    for grp in groups[:FD_ENTRIES]:
        grp = [k for k in grp if k not in [o[0] for o in out]] or grp
        k = grp[int(torch.randint(0, len(grp), (1,), generator=g))]
        out.append((k, int(grads[k].abs().argmax())))
    return out


def f64_check(model, slots, seqs, grads32, entries):
    """float64 autograd of the same job, and central finite differences of its loss (the total loss
    minus the other jobs' losses, which do not depend on this job's parameters)."""
    names = slot_param_names(model, slots)
    model.double()
    params = dict(model.named_parameters())
    s64 = {k: (params[names[k]], ix) for k, (_, ix) in slots.items()}
    with f64_numerics():
        for p, _ in s64.values():
            p.grad = None
        loss64 = job_loss(model, seqs)
        loss64.backward()
        norm_err = 0.0
        for k, (p, ix) in s64.items():
            g64 = p.grad[ix]
            denom = g64.abs().max().item()
            if denom > 0:
                norm_err = max(norm_err, (grads32[k].double() - g64).abs().max().item() / denom)
        rows = []
        with torch.no_grad():
            for k, flat in entries:
                p, ix = s64[k]
                view = p.data[ix].view(-1)
                orig = view[flat].item()
                view[flat] = orig + FD_STEP
                lp = job_loss(model, seqs).item()
                view[flat] = orig - FD_STEP
                lm = job_loss(model, seqs).item()
                view[flat] = orig
                fd = (lp - lm) / (2 * FD_STEP)
                a64 = p.grad[ix].reshape(-1)[flat].item()
                a32 = grads32[k].reshape(-1)[flat].item()
                rows.append((k, flat, fd, abs(a64 - fd) / abs(fd), abs(a32 - fd) / abs(fd)))
    return loss64.item(), norm_err, rows


# ----------------------------------------------------------------------------------------------
# one job
# ----------------------------------------------------------------------------------------------
def run_job(model_name, j, job, lengths):
    spec = MODELS[model_name]
    model, slots = build_job_model(model_name, job)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if job["kind"] == "lora":
        assert all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable
    vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else model.get_base_model().config.vocab_size
    seqs = []
    for s, length in enumerate(lengths):
        tokens, targets, gap, attempt = draw_sequence(
            model, vocab, length, seed=spec["seed"] * 10000 + j * 100 + s, top_k=spec.get("top_k"))
        seqs.append({"job": j, "tokens": tokens, "targets": targets})
        print(f"  [{model_name}] job {j} {job['name']} seq {s}: len {length}, "
              f"labels {sum(t != IGNORE for t in targets)}"
              + (f", router-gap {gap:.4f} (attempt {attempt})" if spec.get("top_k") else ""))
    loss = job_loss(model, seqs)
    loss.backward()
    grads = {k: p.grad[ix].detach().clone().contiguous() if p.grad is not None else torch.zeros_like(p[ix])
             for k, (p, ix) in slots.items()}
    zero = [k for k, g in grads.items() if g.abs().max() == 0]
    print(f"  [{model_name}] job {j} {job['name']}: loss {loss.item():.6f}, {len(grads)} tensors, "
          f"all-zero gradient tensors: {len(zero)}")
    assert not zero, zero  # every adapter tensor must be exercised (e.g. every ESFT expert routed to)
    entries = pick_fd_entries(job, grads, seed=spec["seed"] * 100 + j)
    loss64, norm_err, rows = f64_check(model, slots, seqs, grads, entries)
    print(f"    f64: |loss32-loss64| {abs(loss.item() - loss64):.2e}; "
          f"max|g32-g64|/max|g64| per tensor {norm_err:.2e}")
    worst = max(r[4] for r in rows)
    for k, flat, fd, e64, e32 in rows:
        print(f"    fd {k}[{flat}]: {fd:+.6e}  rel.err f64-autograd {e64:.1e}, f32-autograd {e32:.1e}")
        assert e64 <= TOL_FD_F64, (k, e64)
        assert e32 <= TOL_FD_F32, (k, e32)
    assert norm_err <= TOL_F32_F64, norm_err
    return seqs, loss.item(), grads, worst


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def train_dir(model_name):
    return os.path.join(FIX, model_name, "train")


def job_entry(job):
    return {"name": job["name"], "kind": job["kind"], "path": job["path"],
            "transformers": job["phase"]}


def write_train(model_name, jobs, seqs, losses, grads):
    d = train_dir(model_name)
    lines = ["{", '  "jobs": [']
    lines += [f"    {json.dumps(job_entry(j))}" + ("," if i < len(jobs) - 1 else "")
              for i, j in enumerate(jobs)]
    lines += ["  ],", '  "sequences": [']
    lines += [f"    {json.dumps(s)}" + ("," if i < len(seqs) - 1 else "") for i, s in enumerate(seqs)]
    lines += ["  ]", "}"]
    with open(os.path.join(d, "train.json"), "w") as f:
        f.write("\n".join(lines) + "\n")
    t = {"losses": torch.tensor(losses, dtype=torch.float32)}
    for job in jobs:
        for k, g in grads[job["name"]].items():
            t[f"{job['name']}/{k}"] = g.float().contiguous()
    save_file(t, os.path.join(d, "grads.safetensors"), metadata={"format": "pt"})


def read_train(model_name):
    d = train_dir(model_name)
    with open(os.path.join(d, "train.json")) as f:
        tj = json.load(f)
    t = load_file(os.path.join(d, "grads.safetensors"))
    out = {}
    for i, job in enumerate(tj["jobs"]):
        pre = job["name"] + "/"
        out[job["name"]] = {
            "entry": job,
            "seqs": [s for s in tj["sequences"] if s["job"] == i],
            "loss": t["losses"][i].item(),
            "grads": {k[len(pre):]: v for k, v in t.items() if k.startswith(pre)},
        }
    return out


def make_train_adapters(model_name, phase):
    for name, ph, kw in MODELS[model_name].get("train_loras", []):
        if ph != phase:
            continue
        base = load_base(model_name)
        cfg = LoraConfig(lora_dropout=0.0, bias="none", init_lora_weights=False, **kw)
        mf.make_lora(base, model_name, train_dir(model_name), name, cfg,
                     seed=MODELS[model_name]["seed"] + 300)
        print(f"  [{model_name}] wrote train/adapters/{name}")


def build_model(model_name):
    """Compute every job of this model that belongs to the running phase; merge with the jobs the
    other phase made (qwen2_moe) and write train/."""
    jobs, excluded = discover_jobs(model_name)
    print(f"[{model_name}] jobs: {[j['name'] for j in jobs]} (excluded, target_parameters: {excluded})")
    counts = seq_counts(len(jobs))
    lens = lengths_for(model_name, sum(counts))
    prior = {}
    if any(j["phase"] != TF_MAJOR for j in jobs):
        if not os.path.exists(os.path.join(train_dir(model_name), "train.json")):
            raise SystemExit(f"{model_name}: run the tf4 phase first (tools/oracle/.venv-tf4)")
        prior = read_train(model_name)
    results, worst = {}, 0.0
    off = 0
    for j, job in enumerate(jobs):
        jl = lens[off:off + counts[j]]
        off += counts[j]
        if job["phase"] != TF_MAJOR:
            p = prior[job["name"]]
            assert p["entry"]["path"] == job["path"]
            assert [len(s["tokens"]) for s in p["seqs"]] == jl, "job lengths changed; rerun tf4 phase"
            results[job["name"]] = ([dict(s, job=j) for s in p["seqs"]], p["loss"], p["grads"])
            print(f"  [{model_name}] job {j} {job['name']}: kept from the tf{job['phase']} phase")
            continue
        seqs, loss, grads, w = run_job(model_name, j, job, jl)
        worst = max(worst, w)
        results[job["name"]] = (seqs, loss, grads)
    mine = [j for j in jobs if j["name"] in results]
    seqs = [s for j in mine for s in results[j["name"]][0]]
    write_train(model_name, mine, seqs, [results[j["name"]][1] for j in mine],
                {j["name"]: results[j["name"]][2] for j in mine})
    print(f"  [{model_name}] worst f32-autograd vs f64 finite difference (relative): {worst:.1e}")
    return jobs


def write_partial(model_name):
    """tf4 phase for a tf5 model: only the jobs transformers 4 must make (merged by the tf5 phase)."""
    jobs, _ = discover_jobs(model_name)
    counts = seq_counts(len(jobs))
    lens = lengths_for(model_name, sum(counts))
    offs = [sum(counts[:j]) for j in range(len(jobs))]
    mine, seqs, losses, grads = [], [], [], {}
    for j, job in enumerate(jobs):
        if job["phase"] != TF_MAJOR:
            continue
        s, loss, g, w = run_job(model_name, j, job, lens[offs[j]:offs[j] + counts[j]])
        for x in s:
            x["job"] = len(mine)
        mine.append(job)
        seqs += s
        losses.append(loss)
        grads[job["name"]] = g
    write_train(model_name, mine, seqs, losses, grads)
    print(f"  [{model_name}] wrote the tf4-made job(s) {[j['name'] for j in mine]} (tf5 phase merges)")


# ----------------------------------------------------------------------------------------------
# cross-checks
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def check_base_logits(model_name):
    """The model as loaded here reproduces make_fixtures.py's stored base-request logits."""
    reqs, logits = mf.read_reference(os.path.join(FIX, model_name))
    i = [r["adapter"] for r in reqs].index(None)
    lg = load_base(model_name)(input_ids=torch.tensor([reqs[i]["prompt_ids"]])).logits[0]
    d = (lg - logits[i]).abs().max().item()
    print(f"  [{model_name}] base logits as loaded in this phase vs reference.safetensors: {d:.2e}")
    assert d <= 1e-5, d


class LoraDelta(torch.nn.Module):
    def __init__(self, A, B, scaling):
        super().__init__()
        self.A = torch.nn.Parameter(A.clone())
        self.B = torch.nn.Parameter(B.clone())
        self.scaling = scaling

    def forward(self, W):
        return W + self.scaling * (self.B @ self.A)


def xcheck_other_phase_job(model_name, job_name):
    """Recompute a job made under transformers 4 with transformers 5's model and a hand-made LoRA
    (W + scaling * B @ A as a parametrization of each targeted weight): loss and gradients."""
    stored = read_train(model_name)[job_name]
    ad = os.path.join(FIX, model_name, stored["entry"]["path"])
    with open(os.path.join(ad, "adapter_config.json")) as f:
        ac = json.load(f)
    assert not ac["rank_pattern"] and not ac["alpha_pattern"]
    scaling = ac["lora_alpha"] / (ac["r"] ** 0.5 if ac["use_rslora"] else ac["r"])
    t = load_file(os.path.join(ad, "adapter_model.safetensors"))
    model = load_base(model_name)
    mods = dict(model.named_modules())
    deltas = {}
    for k in sorted(t):
        if not k.endswith(".lora_A.weight"):
            continue
        mod = k[len("base_model.model."):-len(".lora_A.weight")]
        dlt = LoraDelta(t[k], t[k.replace("lora_A", "lora_B")], scaling)
        parametrize.register_parametrization(mods[mod], "weight", dlt)
        deltas[k] = dlt
    loss = job_loss(model, stored["seqs"])
    loss.backward()
    dl = abs(loss.item() - stored["loss"])
    err = 0.0
    for k, dlt in deltas.items():
        for which, p in (("lora_A", dlt.A), ("lora_B", dlt.B)):
            ref = stored["grads"][k.replace("lora_A", which)]
            err = max(err, (p.grad - ref).abs().max().item() / ref.abs().max().item())
    print(f"  [{model_name}] tf5 recomputation of tf4-made job {job_name}: loss {loss.item():.8f} vs "
          f"stored {stored['loss']:.8f}, "
          f"max|dg|/max|g| per tensor {err:.2e} ({2 * len(deltas)} tensors)")
    assert dl <= TOL_XCHECK and err <= TOL_XCHECK, (dl, err)


def sizes(model_name):
    d = train_dir(model_name)
    out = []
    for root, _, fs in sorted(os.walk(d)):
        for f in sorted(fs):
            p = os.path.join(root, f)
            out.append(f"{os.path.relpath(p, FIX)} {os.path.getsize(p)}")
    return out


def main():
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"peft {__import__('peft').__version__} -> phase tf{TF_MAJOR}")
    names = [m for m in MODELS if MODELS[m]["phase"] == TF_MAJOR]
    partial = [m for m in MODELS if MODELS[m]["phase"] != TF_MAJOR and any(
        ph == TF_MAJOR for _, ph, _ in MODELS[m].get("train_loras", []))]
    for m in names + partial:
        if not os.path.exists(os.path.join(FIX, m, "config.json")):
            raise SystemExit(f"{m}: run make_fixtures.py first")
    for m in names + partial:
        if MODELS[m]["phase"] == TF_MAJOR and TF_MAJOR >= 5 and any(
                ph != TF_MAJOR for _, ph, _ in MODELS[m].get("train_loras", [])):
            continue  # keep train/ (train adapters + partial results made by the other phase)
        d = train_dir(m)
        if os.path.exists(d):
            shutil.rmtree(d)
        os.makedirs(d)
    for m in names + partial:
        check_base_logits(m)
        make_train_adapters(m, TF_MAJOR)
    for m in partial:
        write_partial(m)
    for m in names:
        jobs = build_model(m)
        for j in jobs:
            if j["phase"] != TF_MAJOR:
                xcheck_other_phase_job(m, j["name"])
    for m in names + partial:
        print("\n".join("  " + s for s in sizes(m)))
    if TF_MAJOR < 5:
        print("tf4 phase done; now run the tf5 phase with tools/oracle/.venv")


if __name__ == "__main__":
    sys.exit(main())
