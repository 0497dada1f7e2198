#!/usr/bin/env python3
"""Writes the committed seed corpus of each fuzz target (fuzz/seeds/TARGET/) from the project's
own fixtures: the oracle's PEFT and ESFT adapters, training data, and well-formed commands and
requests. libFuzzer mutates from these; what it finds beyond them stays in fuzz/corpus/ (not
committed). Run from anywhere: python3 fuzz/make_seeds.py"""

import json
import pathlib
import shutil
import struct

root = pathlib.Path(__file__).resolve().parent.parent
seeds = root / "fuzz" / "seeds"
fixtures = root / "tools" / "oracle" / "fixtures"
BASES = ["llama", "mistral", "mixtral", "qwen2_moe"]  # as in fuzz_targets/adapter_dir.rs


def put(target, name, data):
    d = seeds / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


shutil.rmtree(seeds, ignore_errors=True)

# Adapters: [base, format, len(config) as u32 LE, config, weights], and their weights alone.
for base_index, base in enumerate(BASES):
    for kind, config_name, weights_name, fmt in [
        ("adapters", "adapter_config.json", "adapter_model.safetensors", 0),
        ("esft", "esft_config.json", "esft_model.safetensors", 1),
    ]:
        for d in sorted((fixtures / base / kind).glob("*")) if (fixtures / base / kind).is_dir() else []:
            config, weights = (d / config_name).read_bytes(), (d / weights_name).read_bytes()
            put("adapter_dir", f"{base}-{d.name}", bytes([base_index, fmt]) + struct.pack("<I", len(config)) + config + weights)
            put("safetensors_file", f"{base}-{d.name}", weights)

# Training data: a few lines of the reverse task, both formats, and the oracle's files.
lines = (root / "data" / "reverse" / "train.jsonl").read_text().splitlines()
put("training_jsonl", "reverse-8", "\n".join(lines[:8]) + "\n")
put("training_jsonl", "prompt-completion", json.dumps({"prompt": "2+2=", "completion": " 4"}) + "\n")
put("training_jsonl", "chat-weights", json.dumps({"messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello", "weight": 0}, {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye"}]}) + "\n")
for f in sorted(fixtures.glob("*/train/*.jsonl")):
    put("training_jsonl", f"{f.parent.parent.name}-{f.name}", f.read_bytes())

# Commands as the log carries them, one proposal per line (the state machine's input).
sha = "ab" * 32
file = {"tenant": "t1", "filename": "a.jsonl", "bytes": 10, "purpose": "fine-tune", "examples": 2, "created_at": 1, "uri": "/blobs/files/file-1.jsonl"}
spec = {"base_model": "tiny", "method": {"type": "lora", "rank": 4, "alpha": 8.0, "targets": ["all-linear"], "rslora": False},
        "hyper": {"epochs": 1, "batch_size": 2}, "training_file": {"id": "file-1", "uri": file["uri"]},
        "checkpoint_every": 10, "learning_rate_multiplier": 1.0}
commands = [
    {"op": "register_worker", "id": "w1", "addr": "127.0.0.1:7001", "gpus": [{"index": 0, "memory_bytes": 1, "models": ["tiny"]}]},
    {"op": "register_model", "name": "tiny", "uri": "/models/tiny"},
    {"op": "create_api_key", "tenant": "t1", "key_sha256": sha, "expires_at": 100},
    {"op": "put_file", "id": "file-1", "file": file},
    {"op": "submit_job", "id": "ftjob-1", "tenant": "t1", "spec": spec, "adapter": "ft-1"},
    {"op": "place_job", "id": "ftjob-1", "worker": "w1"},
    {"op": "report_job", "id": "ftjob-1", "epoch": 1, "report": {"kind": "running", "step": 0}},
    {"op": "report_job", "id": "ftjob-1", "epoch": 1, "report": {"kind": "checkpoint", "step": 1, "uri": "/ckpt/1"}},
    {"op": "put_adapter", "tenant": "t1", "name": "a", "base_model": "tiny", "checksum": "00ff", "uri": "/blobs/adapters/a"},
    {"op": "set_limits", "tenant": "t1", "limits": {"requests_per_minute": 5, "max_files": 1}},
    {"op": "create_group", "group": "g", "model": "tiny", "size": 1},
    {"op": "group_formed", "group": "g", "epoch": 1},
    {"op": "cancel_job", "id": "ftjob-1"},
    {"op": "revoke_api_key", "id": "key_0123456789abcdef"},
    {"op": "delete_file", "tenant": "t1", "id": "file-1"},
    {"op": "delete_adapter", "tenant": "t1", "name": "a"},
    {"op": "mark_worker_dead", "id": "w1"},
    {"op": "remove_placement", "group": "g"},
]
proposals = [json.dumps({"request_id": f"r{i}", "command": c, "at": 1000 + i}) for i, c in enumerate(commands)]
put("state_command", "all", "\n".join(proposals) + "\n")
for i, p in enumerate(proposals):
    put("state_command", f"one-{i}", p + "\n")

# Gateway requests: [route row, key, content type, path parameter, body]; keys: 1 the
# operator's, 3 tenant t1's; content types: 0 JSON, 1 multipart (fuzz_targets/gateway_request.rs).
doc = (root / "docs" / "security.md").read_text()
table = doc.split("| HTTP route | who may call it |")[1].splitlines()[2:]
rows = [r.split("|")[1].strip().strip("`").split(" ", 1) for r in table if r.startswith("|")]
boundary = "fuzz-boundary"


def multipart(fields, files):
    out = ""
    for name, value in fields:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
    for name, value in files:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n\r\n{value}\r\n'
    return out + f"--{boundary}--\r\n"


bodies = {
    ("POST", "/v1/completions"): (0, json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 1, "temperature": 0})),
    ("POST", "/v1/chat/completions"): (0, json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "n": 2, "stream": True})),
    ("POST", "/v1/files"): (1, multipart([("purpose", "fine-tune")], [("file", lines[0])])),
    ("POST", "/v1/fine_tuning/jobs"): (0, json.dumps({"model": "tiny", "training_file": "file-0", "hyperparameters": {"n_epochs": 1}})),
    ("POST", "/v1/adapters"): (1, multipart([("name", "a"), ("base_model", "tiny")], [("adapter_config.json", "{}")])),
    ("POST", "/v1/admin/api-keys"): (0, json.dumps({"tenant": "t1", "expires_in": 60})),
    ("PUT", "/v1/admin/tenants/{tenant}/limits"): (0, json.dumps({"requests_per_minute": 100, "max_files": 10})),
    ("POST", "/v1/admin/groups"): (0, json.dumps({"model": "tiny", "size": 1})),
}
for i, (method, path) in enumerate(rows):
    content_type, body = bodies.get((method, path), (0, ""))
    for key in (1, 3):
        name = f"{i:02}-{method}-{path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}-key{key}"
        put("gateway_request", name, bytes([i, key, content_type, 0]) + body.encode())
print(f"seeds written under {seeds.relative_to(root)}")
