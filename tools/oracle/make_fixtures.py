#!/usr/bin/env python3
"""Build Tandem's numerical-oracle fixtures with Hugging Face transformers + PEFT + torch.

Tiny random-weight models, PEFT LoRA adapters, Tandem-format ESFT adapters and reference
outputs (full prompt logits + 16 greedy tokens per request). See FIXTURES.md for the layout and
every naming/shape convention.

Two phases, one per transformers major version (run them in this order, from the repo root):

    tools/oracle/.venv-tf4/bin/python tools/oracle/make_fixtures.py   # transformers 4.x: mixtral
    tools/oracle/.venv/bin/python     tools/oracle/make_fixtures.py   # transformers 5.x: the rest,
                                                                      # + mixtral cross-check and
                                                                      # its fused-expert adapter

The phase is chosen from the installed transformers version. Everything is seeded: rerunning
both phases reproduces byte-identical files.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import warnings

if os.environ.get("PYTHONHASHSEED") != "0":  # PEFT serialises sets (e.g. resolved "all-linear")
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:])
os.environ["HF_HUB_OFFLINE"] = "1"  # everything is local; never ask the Hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:  # tf5 prints progress bars while loading/saving
    transformers.utils.logging.disable_progress_bar()
except Exception:  # noqa: BLE001
    pass

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TF_MAJOR = int(transformers.__version__.split(".")[0])
HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")
GREEDY_TOKENS = 16
MIN_LOGIT_MARGIN = 2e-3  # top1 - top2 logit gap required at every greedy step
MIN_ROUTER_GAP = 1e-3  # gap between the k-th and (k+1)-th router probability, every token/layer
TOL = 1e-5

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def dtype_kw(dtype):
    return {"dtype": dtype} if TF_MAJOR >= 5 else {"torch_dtype": dtype}


def load_base(cls, path):
    m = cls.from_pretrained(path, attn_implementation="eager", **dtype_kw(torch.float32))
    m.eval()
    return m


def randomize(model, seed, router_std=0.5):
    """Deterministic re-initialisation with magnitudes that make logits/routing decisive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                val = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith(".bias"):
                val = 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith("shared_expert_gate.weight"):
                val = 0.5 * torch.randn(p.shape, generator=g)
            elif (".gate.weight" in name and "gate_proj" not in name) or name.endswith("mlp.gate.weight"):
                val = router_std * torch.randn(p.shape, generator=g)  # MoE router
            else:
                val = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(val.to(p.dtype))


def save_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def reset_dir(path):
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)


class RouterProbe:
    """Records the smallest gap between the k-th and (k+1)-th routing probability."""

    def __init__(self, model, top_k):
        self.top_k = top_k
        self.min_gap = float("inf")
        self.handles = []
        for name, mod in model.named_modules():
            cls = type(mod).__name__
            is_router = cls.endswith("TopKRouter") or (
                isinstance(mod, torch.nn.Linear) and name.endswith("block_sparse_moe.gate")
            )
            if is_router:
                self.handles.append(mod.register_forward_hook(self._hook))

    def _hook(self, mod, inp, out):
        logits = out[0] if isinstance(out, tuple) else out
        probs = torch.softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
        s = probs.sort(dim=-1, descending=True).values
        gap = (s[:, self.top_k - 1] - s[:, self.top_k]).min().item()
        self.min_gap = min(self.min_gap, gap)

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def run_request(model, prompt, top_k=None):
    """Full prompt logits + 16 greedy tokens (generate(), cross-checked by a no-cache loop)."""
    ids = torch.tensor([prompt])
    logits = model(input_ids=ids).logits[0].float().clone()
    probe = RouterProbe(model, top_k) if top_k else None
    cur = ids
    manual, min_margin = [], float("inf")
    for _ in range(GREEDY_TOKENS):
        last = model(input_ids=cur).logits[0, -1].float()
        top = last.topk(2).values
        min_margin = min(min_margin, (top[0] - top[1]).item())
        nxt = int(last.argmax())
        manual.append(nxt)
        cur = torch.cat([cur, torch.tensor([[nxt]])], dim=1)
    router_gap = probe.min_gap if probe else float("inf")
    if probe:
        probe.close()
    gen_cfg = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=GREEDY_TOKENS, eos_token_id=None, pad_token_id=0,
        bos_token_id=None,
    )
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)
    greedy = out[0, len(prompt):].tolist()
    assert len(greedy) == GREEDY_TOKENS, greedy
    assert greedy == manual, f"generate() {greedy} != no-cache greedy loop {manual}"
    return logits, greedy, min_margin, router_gap


def pick_prompt(model_fn, vocab, length, seed, top_k=None):
    """Draw prompts until greedy decoding and routing have no near-ties."""
    for attempt in range(200):
        g = torch.Generator().manual_seed(seed * 1000 + attempt)
        prompt = torch.randint(0, vocab, (length,), generator=g).tolist()
        logits, greedy, margin, rgap = run_request(model_fn(), prompt, top_k)
        if margin >= MIN_LOGIT_MARGIN and rgap >= MIN_ROUTER_GAP:
            return prompt, logits, greedy, margin, rgap
    raise RuntimeError("no prompt without near-ties found")


def lengths_for(model_name, n):
    g = torch.Generator().manual_seed(sum(map(ord, model_name)))
    perm = (torch.randperm(10, generator=g) + 3).tolist()  # distinct lengths in 3..12
    return perm[:n]


def make_lora(base, model_name, out_dir, name, cfg, seed):
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    pm.eval()
    pc = pm.peft_config["default"]
    pc.base_model_name_or_path = model_name
    if isinstance(pc.target_modules, (set, list)):  # PEFT keeps a set in memory: make the file stable
        pc.target_modules = sorted(pc.target_modules)
    d = os.path.join(out_dir, "adapters", name)
    reset_dir(d)
    pm.save_pretrained(d)
    card = os.path.join(d, "README.md")  # PEFT's model-card template, not needed
    if os.path.exists(card):
        os.remove(card)
    return pm


def esft_tensors(arch, spec, H, I, seed):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for layer, experts in spec.items():
        for e in experts:
            if arch == "mixtral":
                p = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
                names = [("w1", (I, H)), ("w2", (H, I)), ("w3", (I, H))]
            else:
                p = f"model.layers.{layer}.mlp.experts.{e}"
                names = [("down_proj", (H, I)), ("gate_proj", (I, H)), ("up_proj", (I, H))]
            for n, shape in names:
                t[f"{p}.{n}.weight"] = (0.1 * torch.randn(shape, generator=g)).contiguous()
    return dict(sorted(t.items()))


def apply_esft(model, arch, tensors):
    """Replace expert weights in memory (handles tf4 per-expert modules and tf5 fused tensors)."""
    sd = dict(model.named_parameters())
    with torch.no_grad():
        for key, val in tensors.items():
            if key in sd:  # tf4 per-expert layout
                sd[key].copy_(val)
                continue
            # tf5 fused layout: model.layers.L.mlp.experts.gate_up_proj [E, 2I, H] (gate rows first)
            parts = key.split(".")
            layer, e, proj = int(parts[2]), int(parts[-3]), parts[-2]
            ex = f"model.layers.{layer}.mlp.experts"
            I = val.shape[0] if proj in ("w1", "w3", "gate_proj", "up_proj") else val.shape[1]
            if proj in ("w1", "gate_proj"):
                sd[f"{ex}.gate_up_proj"][e, :I].copy_(val)
            elif proj in ("w3", "up_proj"):
                sd[f"{ex}.gate_up_proj"][e, I:].copy_(val)
            else:
                sd[f"{ex}.down_proj"][e].copy_(val)


def write_esft(out_dir, model_name, name, spec, tensors):
    d = os.path.join(out_dir, "esft", name)
    reset_dir(d)
    save_json(os.path.join(d, "esft_config.json"), {
        "format": "tandem-esft",
        "version": 1,
        "base_model_name_or_path": model_name,
        "experts": {str(k): sorted(v) for k, v in spec.items()},
    })
    save_file(tensors, os.path.join(d, "esft_model.safetensors"), metadata={"format": "pt"})


def write_reference(out_dir, requests, logits):
    save_json(os.path.join(out_dir, "reference.json"), {"requests": requests})
    save_file({f"logits.{i}": l.contiguous() for i, l in enumerate(logits)},
              os.path.join(out_dir, "reference.safetensors"), metadata={"format": "pt"})


def read_reference(out_dir):
    with open(os.path.join(out_dir, "reference.json")) as f:
        reqs = json.load(f)["requests"]
    t = load_file(os.path.join(out_dir, "reference.safetensors"))
    return reqs, [t[f"logits.{i}"] for i in range(len(reqs))]


# ----------------------------------------------------------------------------------------------
# building one model's fixtures
# ----------------------------------------------------------------------------------------------
def build_model(spec):
    name, cls, cfg = spec["name"], spec["cls"], spec["config"]
    out_dir = os.path.join(FIX, name)
    reset_dir(out_dir)
    torch.manual_seed(spec["seed"])
    m = cls(cfg)
    randomize(m, spec["seed"])
    if spec.get("save_dtype") is not None:
        m = m.to(spec["save_dtype"])
    m.save_pretrained(out_dir, **spec.get("save_kwargs", {}))
    if spec.get("config_rewrite"):
        p = os.path.join(out_dir, "config.json")
        with open(p) as f:
            c = json.load(f)
        spec["config_rewrite"](c)
        save_json(p, c)
    for junk in ("generation_config.json",):
        jp = os.path.join(out_dir, junk)
        if os.path.exists(jp):
            os.remove(jp)
    return out_dir


def produce(spec, lengths, start_index=0):
    """Adapters + ESFT + references for one model; returns (requests, logits)."""
    name, cls = spec["name"], spec["cls"]
    out_dir = os.path.join(FIX, name)
    base = load_base(cls, out_dir)  # references come from exactly what is on disk (upcast to f32)
    vocab = base.config.vocab_size
    top_k = spec.get("top_k")
    requests, logits = [], []
    jobs = []
    if spec.get("with_base", True):
        jobs.append((None, lambda: base))
    for i, (aname, acfg) in enumerate(spec.get("loras", [])):
        pm = make_lora(base, name, out_dir, aname, acfg, seed=spec["seed"] + 100 + i)
        jobs.append((aname, (lambda pm=pm: pm)))
    for ename, espec in spec.get("esft", []):
        H, I = base.config.hidden_size, spec["expert_intermediate"]
        tensors = esft_tensors(spec["arch"], espec, H, I, seed=spec["seed"] + 500)
        write_esft(out_dir, name, ename, espec, tensors)
        em = copy.deepcopy(base)
        apply_esft(em, spec["arch"], tensors)
        em.eval()
        jobs.append((f"esft:{ename}", (lambda em=em: em)))
    assert len(jobs) <= len(lengths)
    for j, (adapter, fn) in enumerate(jobs):
        prompt, lg, greedy, margin, rgap = pick_prompt(
            fn, vocab, lengths[j], seed=spec["seed"] * 10 + start_index + j, top_k=top_k)
        print(f"  [{name}] req {start_index + j}: adapter={adapter} len={len(prompt)} "
              f"greedy-margin={margin:.4f} router-gap={rgap:.4f}")
        requests.append({"adapter": adapter, "prompt_ids": prompt, "greedy": greedy})
        logits.append(lg)
    return requests, logits


# ----------------------------------------------------------------------------------------------
# self-checks: reload everything from disk and reproduce the stored logits
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def self_check(name, cls, arch=None, only=None, tol=TOL, label="self-check", known_bad=()):
    out_dir = os.path.join(FIX, name)
    reqs, logits = read_reference(out_dir)
    worst = 0.0
    for i, (r, ref) in enumerate(zip(reqs, logits)):
        if only is not None and i not in only:
            continue
        base = load_base(cls, out_dir)
        a = r["adapter"]
        if a is None:
            model = base
        elif a.startswith("esft:"):
            d = os.path.join(out_dir, "esft", a[5:])
            with open(os.path.join(d, "esft_config.json")) as f:
                ec = json.load(f)
            t = load_file(os.path.join(d, "esft_model.safetensors"))
            want = {(int(l), e) for l, es in ec["experts"].items() for e in es}
            got = {(int(k.split(".")[2]), int(k.split(".")[-3])) for k in t}
            assert want == got, (want, got)
            apply_esft(base, arch, t)
            model = base
        else:
            model = PeftModel.from_pretrained(base, os.path.join(out_dir, "adapters", a))
            model.eval()
        ids = torch.tensor([r["prompt_ids"]])
        lg = model(input_ids=ids).logits[0].float()
        diff = (lg - ref).abs().max().item()
        worst = max(worst, diff)
        gen_cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=GREEDY_TOKENS,
                                                eos_token_id=None, pad_token_id=0, bos_token_id=None)
        greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                generation_config=gen_cfg)[0, ids.shape[1]:].tolist()
        status = "ok" if diff <= tol and greedy == r["greedy"] else "MISMATCH"
        print(f"  {label} {name} req {i} adapter={a}: max|dlogits|={diff:.2e} "
              f"greedy {'==' if greedy == r['greedy'] else '!='} stored -> {status}")
        if status != "ok" and a in known_bad:
            print(f"    (expected: {known_bad[a]})")
        elif status != "ok":
            raise SystemExit(f"{label} failed for {name} request {i}")
    return worst


@torch.no_grad()
def check_param_wrapper_math(name, cls, adapter):
    """Recompute the fused-expert LoRA delta by hand from the saved tensors (FIXTURES.md formula)."""
    out_dir = os.path.join(FIX, name)
    ad = os.path.join(out_dir, "adapters", adapter)
    with open(os.path.join(ad, "adapter_config.json")) as f:
        ac = json.load(f)
    t = load_file(os.path.join(ad, "adapter_model.safetensors"))
    base = load_base(cls, out_dir)
    merged = copy.deepcopy(base)
    E = base.config.num_local_experts if hasattr(base.config, "num_local_experts") else base.config.num_experts
    r, alpha = ac["r"], ac["lora_alpha"]
    scaling = alpha / math.sqrt(r) if ac["use_rslora"] else alpha / r
    sd = dict(merged.named_parameters())
    n_fused = 0
    for l in range(base.config.num_hidden_layers):
        pre = f"base_model.model.model.layers.{l}.mlp.experts"
        # registration order in the experts module: gate_up_proj, then down_proj.
        # innermost wrapper (most ".base_layer") = first registered targeted parameter.
        mapping = {f"{pre}.base_layer": "gate_up_proj", f"{pre}": "down_proj"}
        for kp, pname in mapping.items():
            A, B = t[f"{kp}.lora_A.weight"], t[f"{kp}.lora_B.weight"]
            W = sd[f"model.layers.{l}.mlp.experts.{pname}"]  # [E, out, in]
            for e in range(E):
                Ae = A[e * r:(e + 1) * r, :]  # [r, in]
                Be = B[:, e::E]  # column k*E + e  -> [out, r]
                W[e] += scaling * (Be @ Ae)
            n_fused += 1
    # non-expert LoRA targets of the same adapter (plain modules): W += scaling * B @ A
    for k in t:
        if ".mlp.experts." in k or not k.endswith("lora_A.weight"):
            continue
        mod = k[len("base_model.model."):-len(".lora_A.weight")]
        W = sd[f"{mod}.weight"]
        W += scaling * (t[k.replace("lora_A", "lora_B")] @ t[k])
    peft_model = PeftModel.from_pretrained(load_base(cls, out_dir), ad)
    ids = torch.tensor([[1, 5, 9, 17, 33, 2, 7]])
    d = (merged(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max().item()
    print(f"  hand-merged fused-expert LoRA ({name}/{adapter}, {n_fused} fused params): "
          f"max|dlogits| vs PEFT = {d:.2e}")
    assert d < 1e-5, d


def build_fused_checkpoint(src, cls):
    """<src>_fused: the same weights saved with save_original_format=False (fused experts on disk)."""
    dst = f"{src}_fused"
    out_dir = os.path.join(FIX, dst)
    reset_dir(out_dir)
    load_base(cls, os.path.join(FIX, src)).save_pretrained(out_dir, save_original_format=False)
    gc = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(gc):
        os.remove(gc)
    reqs, lg = read_reference(os.path.join(FIX, src))
    assert reqs[0]["adapter"] is None
    fused = load_base(cls, out_dir)
    logits, greedy, _, _ = run_request(fused, reqs[0]["prompt_ids"])
    d = (logits - lg[0]).abs().max().item()
    print(f"  [{dst}] base request reproduced from the fused-on-disk checkpoint: max|dlogits|={d:.2e}")
    assert d <= TOL and greedy == reqs[0]["greedy"]
    write_reference(out_dir, reqs[:1], lg[:1])
    self_check(dst, cls)


# ----------------------------------------------------------------------------------------------
# model specs
# ----------------------------------------------------------------------------------------------
def tf4_specs():
    from transformers import MixtralConfig, MixtralForCausalLM

    mixtral_cfg = MixtralConfig(
        vocab_size=160, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    return [{
        "name": "mixtral", "cls": MixtralForCausalLM, "config": mixtral_cfg, "seed": 5,
        "arch": "mixtral", "top_k": 2, "expert_intermediate": 24,
        "loras": [
            ("experts_r4", LoraConfig(r=4, lora_alpha=8, target_modules=["w1", "w2", "w3"],
                                      lora_dropout=0.0, bias="none", init_lora_weights=False)),
            ("attn_w2_pattern", LoraConfig(
                r=2, lora_alpha=4,
                target_modules=r".*\.(self_attn\.(q_proj|v_proj)|block_sparse_moe\.experts\.\d+\.w2)",
                rank_pattern={"w2": 6}, alpha_pattern={"w2": 3},
                lora_dropout=0.0, bias="none", init_lora_weights=False)),
        ],
        "esft": [("esft_a", {0: [1, 3], 1: [2]})],
    }]


def tf5_specs():
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM)

    llama_cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
    )
    tied_cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    )

    def legacy_rope(c):  # llama_tied's config.json in the pre-transformers-5 spelling
        rp = c.pop("rope_parameters")
        c["rope_theta"] = rp["rope_theta"]
        c["rope_scaling"] = {"type": "linear", "factor": rp["factor"]}

    mistral_cfg = MistralConfig(
        vocab_size=200, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-5, sliding_window=32, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    qwen2_cfg = Qwen2Config(
        vocab_size=192, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    qwen2_moe_cfg = Qwen2MoeConfig(
        vocab_size=144, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=24, shared_expert_intermediate_size=40, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True, use_sliding_window=False,
        bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )

    def lc(**kw):
        kw.setdefault("lora_dropout", 0.0)
        kw.setdefault("bias", "none")
        return LoraConfig(init_lora_weights=False, **kw)

    return [
        {"name": "llama", "cls": LlamaForCausalLM, "config": llama_cfg, "seed": 1, "loras": [
            ("attn_r8_layer1", lc(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                  layers_to_transform=[1])),
            ("mlp_rslora_r4", lc(r=4, lora_alpha=8, use_rslora=True,
                                 target_modules=r".*\.mlp\.(gate_proj|up_proj|down_proj)")),
            ("all_linear_patterns", lc(r=2, lora_alpha=4, target_modules="all-linear",
                                       rank_pattern={"o_proj": 4, "layers.1.mlp.down_proj": 6},
                                       alpha_pattern={"o_proj": 2, "layers.1.mlp.down_proj": 12})),
        ]},
        {"name": "llama_tied", "cls": LlamaForCausalLM, "config": tied_cfg, "seed": 2,
         "save_kwargs": {"max_shard_size": "40KB"}, "config_rewrite": legacy_rope, "loras": [
            ("qv_r4", lc(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"])),
            ("mlp_r2", lc(r=2, lora_alpha=5, target_modules=["gate_proj", "up_proj", "down_proj"])),
        ]},
        {"name": "mistral", "cls": MistralForCausalLM, "config": mistral_cfg, "seed": 3, "loras": [
            ("attn_regex_r8", lc(r=8, lora_alpha=32, target_modules=r".*layers\.0\.self_attn\.(q_proj|v_proj)")),
            ("all_linear_r4", lc(r=4, lora_alpha=6, target_modules="all-linear")),
        ]},
        {"name": "qwen2", "cls": Qwen2ForCausalLM, "config": qwen2_cfg, "seed": 4,
         "save_dtype": torch.bfloat16, "loras": [
            ("qkv_r8", lc(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"])),
            ("all_linear_rslora_r2", lc(r=2, lora_alpha=4, use_rslora=True, target_modules="all-linear")),
        ]},
        {"name": "qwen2_moe", "cls": Qwen2MoeForCausalLM, "config": qwen2_moe_cfg, "seed": 6,
         "arch": "qwen2_moe", "top_k": 2, "expert_intermediate": 24, "loras": [
            ("fused_experts_shared_r4", lc(
                r=4, lora_alpha=8,
                target_modules=["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"],
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
            ("attn_shared_rslora_r8", lc(
                r=8, lora_alpha=4, use_rslora=True,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "shared_expert.down_proj"])),
        ], "esft": [("esft_a", {0: [1, 3], 1: [2]})]},
    ]


MIXTRAL_FUSED = ("experts_fused_r4", dict(
    r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.0, bias="none", target_modules=[],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))


# ----------------------------------------------------------------------------------------------
def fixtures_size():
    total, files = 0, 0
    for root, _, fs in os.walk(FIX):
        for f in fs:
            total += os.path.getsize(os.path.join(root, f))
            files += 1
    return total, files


def main():
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"peft {__import__('peft').__version__} -> phase tf{TF_MAJOR}")
    os.makedirs(FIX, exist_ok=True)
    if TF_MAJOR < 5:
        for spec in tf4_specs():
            build_model(spec)
            reqs, lg = produce(spec, lengths_for(spec["name"], 5))
            write_reference(os.path.join(FIX, spec["name"]), reqs, lg)
            self_check(spec["name"], spec["cls"], spec.get("arch"))
        print("tf4 phase done; now run the tf5 phase with tools/oracle/.venv")
    else:
        from transformers import MixtralForCausalLM

        for spec in tf5_specs():
            build_model(spec)
            reqs, lg = produce(spec, lengths_for(spec["name"], 4))
            write_reference(os.path.join(FIX, spec["name"]), reqs, lg)
            self_check(spec["name"], spec["cls"], spec.get("arch"))
        check_param_wrapper_math("qwen2_moe", __import__("transformers").Qwen2MoeForCausalLM,
                                 "fused_experts_shared_r4")
        build_fused_checkpoint("qwen2_moe", __import__("transformers").Qwen2MoeForCausalLM)

        # ---- mixtral: built by the tf4 phase; cross-check it under tf5, then add the fused adapter
        mdir = os.path.join(FIX, "mixtral")
        if not os.path.exists(os.path.join(mdir, "reference.json")):
            raise SystemExit("run the tf4 phase first (tools/oracle/.venv-tf4)")
        reqs, lg = read_reference(mdir)
        keep = [i for i, r in enumerate(reqs) if r["adapter"] != MIXTRAL_FUSED[0]]
        reqs, lg = [reqs[i] for i in keep], [lg[i] for i in keep]
        write_reference(mdir, reqs, lg)  # idempotent: drop what a previous tf5 run appended
        self_check("mixtral", MixtralForCausalLM, "mixtral", tol=1e-5,
                   label="tf5 cross-check of tf4-made", known_bad={
                       "attn_w2_pattern": "PEFT's tf4->tf5 MoE adapter conversion does not map a regex "
                       "target_modules naming per-expert modules (experts.N.w2) onto the fused experts: it "
                       "loads only q_proj/v_proj, silently drops the w2 LoRA tensors and ignores rank_pattern/"
                       "alpha_pattern ('w2'); the tf4reference above is the correct one"})
        spec = {"name": "mixtral", "cls": MixtralForCausalLM, "seed": 5, "top_k": 2,
                "with_base": False,
                "loras": [(MIXTRAL_FUSED[0], LoraConfig(init_lora_weights=False, **MIXTRAL_FUSED[1]))]}
        new_reqs, new_lg = produce(spec, lengths_for("mixtral", 5)[len(reqs):], start_index=len(reqs))
        write_reference(mdir, reqs + new_reqs, lg + new_lg)
        self_check("mixtral", MixtralForCausalLM, "mixtral", only=set(range(len(reqs), len(reqs) + 1)))
        check_param_wrapper_math("mixtral", MixtralForCausalLM, MIXTRAL_FUSED[0])

    total, files = fixtures_size()
    print(f"fixtures: {files} files, {total} bytes ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    sys.exit(main())
