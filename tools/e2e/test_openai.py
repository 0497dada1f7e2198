"""End-to-end test of a running Tandem cluster, driven by the official `openai` Python client.

Run by tools/e2e/run, which starts the cluster and sets TANDEM_URL (the /v1 base URL),
TANDEM_ADMIN_KEY (the operator key), TANDEM_DATA (the `reverse` data set), TANDEM_DATA_DIR (the
cluster's data folder) and TANDEM_S3 (the S3 endpoint it reads adapters from). Plain script:
prints each step as it passes, exits non-zero on the first failure.
"""

import json
import os
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal

import openai
import pydantic

URL = os.environ["TANDEM_URL"].rstrip("/")
ADMIN_KEY = os.environ["TANDEM_ADMIN_KEY"]
DATA = Path(os.environ.get("TANDEM_DATA", "data/reverse"))
BASE = "small"
T0 = time.monotonic()


def ok(msg):
    print(f"[{time.monotonic() - T0:7.1f}s] ok  {msg}", flush=True)


def client(key):
    return openai.OpenAI(base_url=URL, api_key=key, max_retries=0, timeout=60)


def expect(exc, what, fn):
    """Calls fn, which must raise exc; returns the exception."""
    try:
        fn()
    except exc as e:
        return e
    except openai.APIError as e:
        raise AssertionError(f"{what}: expected {exc.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"{what}: expected {exc.__name__}, but the call succeeded")


def http(method, path, body=None, key=None):
    """A raw request (for routes that are not OpenAI's); returns (status, parsed JSON or text)."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def all_items(page):
    """Every item of a cursor-paginated list (guarded against a server that ignores `after`)."""
    items, seen = [], set()
    for _ in range(100):
        fresh = [x for x in page.data if getattr(x, "id", None) not in seen]
        if not fresh:
            break
        items += fresh
        seen.update(getattr(x, "id", None) for x in fresh)
        if not page.has_next_page():
            break
        page = page.get_next_page()
    return items


def model_ids(c):
    return {m.id for m in c.models.list().data}


def complete(c, model, prompt="Hello", **kw):
    r = c.completions.create(model=model, prompt=prompt, **{"max_tokens": 8, **kw})
    assert len(r.choices) == 1, f"expected one choice, got {len(r.choices)}"
    return r


def exact_matches(c, model, rows):
    hits = 0
    for row in rows:
        r = complete(c, model, row["prompt"], max_tokens=16, temperature=0, stop=["\n"])
        hits += r.choices[0].text.strip() == row["completion"].strip()
    return hits


def main():
    train = DATA / "train.jsonl"
    test_rows = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()[:20]]

    # a. Tenant keys from the admin route.
    keys = {}
    for tenant in ("alice", "bob"):
        status, body = http("POST", "/admin/api-keys", {"tenant": tenant}, key=ADMIN_KEY)
        assert status == 200, f"POST /admin/api-keys for {tenant}: {status} {body}"
        assert isinstance(body, dict) and body.get("object") == "api_key" and body.get("tenant") == tenant, body
        assert body.get("key"), f"no key in {body}"
        keys[tenant] = body["key"]
    alice, bob = client(keys["alice"]), client(keys["bob"])
    ok("admin made API keys for alice and bob")

    # b. The base model is listed.
    assert BASE in model_ids(alice), f"{BASE!r} not in alice's models: {model_ids(alice)}"
    ok(f"models.list() has {BASE!r}")

    # c. A completion.
    r = complete(alice, BASE)
    assert r.usage and 1 <= r.usage.completion_tokens <= 8, f"completion_tokens: {r.usage}"
    assert r.choices[0].finish_reason in ("length", "stop"), r.choices[0].finish_reason
    ok(f"completion: {r.choices[0].text!r} ({r.usage.completion_tokens} tokens, {r.choices[0].finish_reason})")

    # d. A streamed chat completion with usage in the last chunk. Greedy, because the random
    #    model samples its end-of-text token first in about one stream of 300.
    chunks = list(
        alice.chat.completions.create(
            model=BASE,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert content, f"no content chunk among {len(chunks)} chunks"
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens >= 1, f"last chunk has no usage: {chunks[-1]}"
    ok(f"streamed chat: {len(chunks)} chunks, {''.join(content)!r}, usage {chunks[-1].usage.total_tokens} tokens")

    # d2. The rest of the completions and chat surface (docs/gateway.md's table).
    assert alice.models.retrieve(BASE).id == BASE
    r = alice.completions.create(model=BASE, prompt=["Hello", "Hi"], n=2, max_tokens=4, temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3], r
    assert r.choices[0].text == r.choices[1].text, "greedy choices of one prompt agree"
    r = alice.completions.create(model=BASE, prompt=[1, 2, 3], max_tokens=2)
    assert r.usage.prompt_tokens == 3, r.usage
    r = alice.completions.create(model=BASE, prompt="Hello", max_tokens=4, best_of=3, seed=5, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(r.choices) == 1, r
    assert len(lp.tokens) == len(lp.top_logprobs) and all(1 <= len(t) <= 2 for t in lp.top_logprobs), lp
    assert r.usage.completion_tokens >= len(lp.tokens) + 2, f"every candidate's tokens count: {r.usage}"
    r = alice.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=3,
        logprobs=True, top_logprobs=2, presence_penalty=1, frequency_penalty=0.5, logit_bias={"5": 2},
        seed=1, stop=["\n\n", "###"], user="e2e-user",
    )
    assert all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content), r
    r = alice.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}], temperature=0)
    assert r.choices[0].finish_reason == "stop" or r.usage.completion_tokens > 16, f"chat's default bound: {r.usage}"
    e = expect(openai.BadRequestError, "suffix", lambda: alice.completions.create(model=BASE, prompt="Hi", suffix="!"))
    assert e.param == "suffix", e
    e = expect(
        openai.BadRequestError, "a typo",
        lambda: alice.completions.create(model=BASE, prompt="Hi", extra_body={"temprature": 0.5}),
    )
    assert e.param == "temprature", e
    # Structured outputs through the client's parse helper: a pydantic model's strict schema.
    class Pick(pydantic.BaseModel):
        color: Literal["red", "green", "blue"]
        sure: bool

    parsed = alice.chat.completions.parse(
        model=BASE, messages=[{"role": "user", "content": "Pick a color"}], response_format=Pick, max_tokens=40, n=3
    )
    picks = [c.message.parsed for c in parsed.choices]
    assert all(isinstance(p, Pick) for p in picks), [c.message.content for c in parsed.choices]
    # Tools: the helpers' strict function tool (pydantic), its calls parsed whole and streamed,
    # and a conversation carrying a call and its answer back.
    class Weather(pydantic.BaseModel):
        city: Literal["Oslo", "Rome"]
        celsius: bool

    tools = [openai.pydantic_function_tool(Weather, name="weather")]
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    parsed = alice.chat.completions.parse(
        model=BASE, messages=ask, tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=120
    )
    message = parsed.choices[0].message
    assert parsed.choices[0].finish_reason == "tool_calls" and message.content is None, parsed
    assert len(message.tool_calls) == 1 and isinstance(message.tool_calls[0].function.parsed_arguments, Weather), parsed
    named = {"type": "function", "function": {"name": "weather"}}
    with alice.chat.completions.stream(model=BASE, messages=ask, tools=tools, tool_choice=named, max_tokens=120) as s:
        streamed = s.get_final_completion()
    calls = streamed.choices[0].message.tool_calls
    assert len(calls) == 1 and isinstance(calls[0].function.parsed_arguments, Weather), streamed
    call = message.tool_calls[0]
    back = ask + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "weather", "arguments": call.function.arguments}},
        ]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21"},
    ]
    r = alice.chat.completions.create(model=BASE, messages=back, tools=tools, tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length", r
    e = alice.embeddings.create(model=BASE, input=["Hello", "Hi"])  # the client asks for base64
    f = alice.embeddings.create(model=BASE, input=["Hello", "Hi"], encoding_format="float")
    assert [len(d.embedding) for d in e.data] == [256, 256] and e.usage.prompt_tokens >= 2, e.usage
    assert all(abs(a - b) < 1e-5 for a, b in zip(e.data[0].embedding, f.data[0].embedding)), "base64 and float agree"
    assert abs(sum(x * x for x in f.data[1].embedding) - 1) < 1e-4, "unit length"
    ok(f"structured outputs parsed: {picks[0]}; tool calls parsed, whole and streamed: {calls[0].function.parsed_arguments}; models.retrieve, prompt batches and token ids, best_of, alternatives, penalties, bias, embeddings; unserved: a 400")

    # e. Upload the training file; it is alice's only.
    with open(train, "rb") as f:
        file = alice.files.create(file=f, purpose="fine-tune")
    assert file.id.startswith("file-"), file.id
    assert file.bytes == train.stat().st_size, f"bytes {file.bytes} != {train.stat().st_size}"
    assert file.status == "processed", file.status
    assert file.id in {x.id for x in all_items(alice.files.list())}, "alice's files.list() lacks the upload"
    assert file.id not in {x.id for x in all_items(bob.files.list())}, "bob sees alice's file"
    expect(openai.NotFoundError, "bob retrieving alice's file", lambda: bob.files.retrieve(file.id))
    ok(f"uploaded {file.id} ({file.bytes} bytes); bob cannot see it")

    # f. A fine-tuning job (learning rate 1e-3 x multiplier), with a validation file.
    with open(DATA / "valid.jsonl", "rb") as f:
        valid = alice.files.create(file=f, purpose="fine-tune")
    job = alice.fine_tuning.jobs.create(
        model=BASE,
        training_file=file.id,
        validation_file=valid.id,
        suffix="rev",
        seed=0,
        method={"type": "supervised"},
    )
    assert job.status in ("validating_files", "queued", "running"), job.status
    assert job.hyperparameters.n_epochs == "auto" and job.hyperparameters.batch_size == "auto", job.hyperparameters
    ok(f"created job {job.id} ({job.status}), hyperparameters left to auto")

    # g. Serving keeps answering while the job trains.
    latencies, deadline, last = [], time.monotonic() + 900, None
    while True:
        job = alice.fine_tuning.jobs.retrieve(job.id)
        if job.status != last:
            ok(f"job {job.id} is {job.status}")
            last = job.status
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, f"job still {job.status} after 900 s"
        if job.status == "running" and len(latencies) < 6:
            t = time.monotonic()
            if len(latencies) % 2:
                r = alice.chat.completions.create(
                    model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=8
                )
                assert r.choices and r.usage.completion_tokens >= 1, f"chat during training: {r}"
            else:
                r = complete(alice, BASE)
                assert r.usage.completion_tokens >= 1, f"completion during training: {r}"
            latencies.append(time.monotonic() - t)
            ok(f"served a request during training in {latencies[-1] * 1000:.0f} ms")
        time.sleep(2)
    assert job.status == "succeeded", f"job ended {job.status}: {job.error}"
    assert len(latencies) >= 3, f"only {len(latencies)} requests served while the job was running"
    ok("latencies during training (ms): " + ", ".join(f"{x * 1000:.0f}" for x in latencies))
    assert job.fine_tuned_model and job.fine_tuned_model.startswith(f"ft:{BASE}:"), job.fine_tuned_model
    ok(f"job succeeded: {job.fine_tuned_model}")
    h = job.hyperparameters
    assert (h.n_epochs, h.batch_size, h.learning_rate_multiplier) == (2, 16, 1.0), f"auto for 4000 examples: {h}"
    assert job.trained_tokens and job.trained_tokens > 8000, job.trained_tokens
    ok(f"auto resolved to {h.n_epochs} epochs of batch {h.batch_size}; {job.trained_tokens} tokens trained")

    events = all_items(alice.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = sorted(
        (e.data for e in events if isinstance(e.data, dict) and "step" in e.data and "train_loss" in e.data),
        key=lambda d: d["step"],
    )
    assert metrics, f"no metrics events among {len(events)} events"
    first, final = metrics[0], metrics[-1]
    ok(f"{len(metrics)} metrics events: loss {first['train_loss']:.4f} (step {first['step']}) -> {final['train_loss']:.4f} (step {final['step']})")
    assert final["train_loss"] < first["train_loss"], "training loss did not go down"
    valid_losses = [e.data["valid_loss"] for e in events if isinstance(e.data, dict) and "valid_loss" in e.data]
    assert valid_losses, "no validation loss among the events"
    assert valid_losses[0] < first["train_loss"] / 2, f"validation loss {valid_losses[0]} after training"
    ok(f"validation loss after training: {valid_losses[0]:.4f}")

    # h. Checkpoints.
    checkpoints = all_items(alice.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints, "no checkpoints"
    assert all(c.object == "fine_tuning.job.checkpoint" and c.step_number is not None for c in checkpoints), checkpoints
    ok(f"{len(checkpoints)} checkpoint(s), steps {[c.step_number for c in checkpoints]}")
    r = complete(alice, checkpoints[0].fine_tuned_model_checkpoint, "reverse: a b c\n=", temperature=0)
    assert alice.models.retrieve(checkpoints[0].fine_tuned_model_checkpoint).id == checkpoints[0].fine_tuned_model_checkpoint
    ok(f"checkpoint {checkpoints[0].fine_tuned_model_checkpoint} answers: {r.choices[0].text!r}")

    # i. The adapter learned to reverse; the random base did not.
    ft = job.fine_tuned_model
    hits = exact_matches(alice, ft, test_rows)
    ok(f"fine-tuned model: {hits}/20 exact reversals")
    assert hits >= 16, f"fine-tuned model got only {hits}/20 right"
    tuned, base = (alice.embeddings.create(model=m, input="reverse: a b c\n=").data[0].embedding for m in (ft, BASE))
    assert max(abs(a - b) for a, b in zip(tuned, base)) > 1e-3, "the adapter's embedding is its own"
    base_hits = exact_matches(alice, BASE, test_rows)
    ok(f"base model: {base_hits}/20 exact reversals")
    assert base_hits < 4, f"the base model got {base_hits}/20 right: is the adapter applied to base requests?"

    # i2. Adapters from anywhere (vLLM's routes): the job's adapter from S3 (moto) and a
    # checkpoint's from the gateway's disk, the operator's both; a request running on the old
    # version finishes on it while the new version serves the next.
    # tandem up's --data-dir (where the job's adapters are) and the S3 endpoint (moto) it was given.
    data_dir, s3 = Path(os.environ["TANDEM_DATA_DIR"]), os.environ["TANDEM_S3"]
    operator = client(ADMIN_KEY)
    final_dir = next(data_dir.resolve().rglob(f"*{job.id}*/adapter/adapter_config.json")).parent
    step = checkpoints[0].step_number
    ckpt_dir = next(data_dir.resolve().rglob(f"*{job.id}*/checkpoints/step-{step:06d}/adapter/adapter_config.json")).parent
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if name == "adapter_config.json":
            urllib.request.urlopen(urllib.request.Request(f"{s3}/adapters", method="PUT"), timeout=10).close()
        # (urllib's default content type is a form's, which moto's server would wait to parse.)
        put = urllib.request.Request(
            f"{s3}/adapters/reverse/{name}", data=(final_dir / name).read_bytes(), method="PUT",
            headers={"Content-Type": "application/octet-stream"},
        )
        urllib.request.urlopen(put, timeout=30).close()
    status, body = http("POST", "/load_lora_adapter", {"lora_name": "rev", "lora_path": "s3://adapters/reverse"}, ADMIN_KEY)
    assert status == 200 and body["version"] == 1, (status, body)
    s3_hits = exact_matches(operator, "rev", test_rows)
    assert s3_hits >= 16, f"the job's adapter read back from S3 got {s3_hits}/20 right"
    for path in ("s3://adapters/reverse", f"file://{final_dir}", f"{s3}/adapters/reverse"):
        status, body = http("POST", "/load_lora_adapter", {"lora_name": "x", "lora_path": path}, alice.api_key)
        assert status == 403, f"alice loading {path}: {status} {body}"
    long = dict(prompt="reverse: q w e r t y\n=", max_tokens=300, temperature=0, logit_bias={"509": -100, "511": -100})
    v1 = complete(operator, "rev", **long).choices[0].text
    v2 = complete(alice, checkpoints[0].fine_tuned_model_checkpoint, **long).choices[0].text
    assert v1 != v2, "the final adapter and the checkpoint answer alike: the swap below would prove nothing"
    stream = operator.completions.create(model="rev", stream=True, **long)
    chunks = iter(stream)
    streamed = next(chunks).choices[0].text
    status, body = http("POST", "/load_lora_adapter", {"lora_name": "rev", "lora_path": f"file://{ckpt_dir}"}, ADMIN_KEY)
    assert status == 200 and body["version"] == 2, (status, body)
    after = complete(operator, "rev", **long).choices[0].text
    rest = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed + rest == v1, "the request running on version 1 did not finish on it"
    assert after == v2, "a request after the load did not get version 2"
    status, body = http("POST", "/unload_lora_adapter", {"lora_name": "rev"}, ADMIN_KEY)
    assert status == 200 and body["deleted"], (status, body)
    expect(openai.NotFoundError, "the unloaded adapter", lambda: complete(operator, "rev"))
    ok(f"adapters loaded from S3 ({s3_hits}/20 exact reversals) and the gateway's disk (the operator's), swapped under a running stream, unloaded; alice refused")

    # j. The fine-tuned model is alice's only.
    assert ft in model_ids(alice), "alice's models.list() lacks the fine-tuned model"
    assert ft not in model_ids(bob), "bob sees alice's fine-tuned model"
    found = alice.models.retrieve(ft)
    assert found.id == ft and found.owned_by == "alice" and getattr(found, "parent", None) == BASE, found
    assert alice.models.retrieve(BASE).owned_by == "tandem"
    expect(openai.NotFoundError, "bob retrieving alice's model", lambda: bob.models.retrieve(ft))
    ok("the fine-tuned model is listed and retrieved for alice only")

    # k. Bad input gets the right error, and the server keeps serving.
    expect(openai.AuthenticationError, "wrong API key", lambda: client("wrong").models.list())
    status, body = http("GET", "/models")
    assert status == 401, f"no API key: expected 401, got {status} {body}"
    expect(openai.NotFoundError, "bob using alice's model", lambda: complete(bob, ft))
    expect(openai.NotFoundError, "unknown model", lambda: complete(alice, "no-such-model"))
    expect(openai.BadRequestError, "max_tokens beyond the context", lambda: complete(alice, BASE, max_tokens=100000))
    broken = b'{"prompt": "a", "completion": "b"}\n{not json\n'
    e = expect(
        openai.BadRequestError,
        "broken JSONL upload",
        lambda: alice.files.create(file=("broken.jsonl", broken, "application/jsonl"), purpose="fine-tune"),
    )
    assert "line 2" in f"{e.message} {e.body}", f"the error does not mention line 2: {e.message} {e.body}"
    huge = [{"role": "user", "content": "a" * (40 << 20)}]
    e = expect(
        openai.APIStatusError,
        "40 MiB body",
        lambda: alice.chat.completions.create(model=BASE, messages=huge, max_tokens=1),
    )
    assert e.status_code == 413, f"40 MiB body: expected 413, got {e.status_code}: {e.message}"
    expect(
        openai.BadRequestError,
        "n=100",
        lambda: alice.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=1, n=100
        ),
    )
    complete(alice, BASE)
    ok("bad requests rejected (401, 404, 404, 400, 400 at line 2, 413, 400); still serving")

    # l. Cancelling a job.
    job2 = alice.fine_tuning.jobs.create(model=BASE, training_file=file.id, hyperparameters={"n_epochs": 1})
    alice.fine_tuning.jobs.cancel(job2.id)
    deadline = time.monotonic() + 30
    while (job2 := alice.fine_tuning.jobs.retrieve(job2.id)).status != "cancelled":
        assert time.monotonic() < deadline, f"job {job2.id} still {job2.status} 30 s after cancel"
        time.sleep(1)
    expect(openai.NotFoundError, "bob retrieving alice's job", lambda: bob.fine_tuning.jobs.retrieve(job2.id))
    ok(f"job {job2.id} cancelled; bob cannot see it")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        print(f"E2E FAILED after {time.monotonic() - T0:.1f}s", flush=True)
        sys.exit(1)
    print(f"E2E PASSED in {time.monotonic() - T0:.1f}s", flush=True)
