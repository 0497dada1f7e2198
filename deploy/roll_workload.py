#!/usr/bin/env python3
"""The client of the rolling-upgrade test (deploy/netns-cluster.sh --roll), a tenant's workload.

    roll_workload.py start GATEWAYS DIR   (TANDEM_API_KEY: the tenant's key)
        Starts a fine-tuning job long enough to train through the roll (its id in DIR/started),
        then calls completions (two at a time) and uploads files until DIR/stop appears; writes
        what it saw to DIR/results.json.
    roll_workload.py check GATEWAYS DIR
        Waits for the job to succeed, reads back every file whose upload was acknowledged, and
        reports; exits 1 if an acknowledged file is lost or the job did not succeed.

GATEWAYS: HOST:PORT,... . As a load balancer would, a call that finds a gateway not accepting
connections (its coordinator is being replaced) goes to the next one: counted as moved, not as
an error. An error is an answer other than 200, or a connection that broke after it was taken.
"""

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

GATEWAYS = sys.argv[2].split(",")
DIR = Path(sys.argv[3])
KEY = os.environ["TANDEM_API_KEY"]
lock = threading.Lock()
seen = {"completions": 0, "completion_errors": [], "moved": 0, "files": {}, "upload_errors": []}


class Refused(Exception):
    """No gateway accepted the connection."""


def call(method, path, body=None, content_type="application/json", start=0):
    """The JSON answer of the first gateway, from `start` on, that takes the connection."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    for i in range(len(GATEWAYS)):
        gateway = GATEWAYS[(start + i) % len(GATEWAYS)]
        request = urllib.request.Request(f"http://{gateway}{path}", data=data, method=method)
        request.add_header("Authorization", f"Bearer {KEY}")
        if data is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return json.load(answer)
        except urllib.error.URLError as e:
            if isinstance(e, urllib.error.HTTPError) or not isinstance(e.reason, ConnectionRefusedError):
                raise
            with lock:
                seen["moved"] += 1
    raise Refused(f"no gateway of {GATEWAYS} took the connection")


def upload(name, text, start=0):
    boundary = "roll-boundary"
    form = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
        f"Content-Type: application/jsonl\r\n\r\n{text}\r\n--{boundary}--\r\n"
    ).encode()
    return call("POST", "/v1/files", form, f"multipart/form-data; boundary={boundary}", start)


def completions(worker):
    i = 0
    while not (DIR / "stop").exists():
        i += 1
        try:
            out = call("POST", "/v1/completions", {"model": "base", "prompt": f"roll {i}", "max_tokens": 4}, start=i)
            # A random-weight model may sample its end of text before 4 tokens: any ending is one.
            ok = out.get("choices", [{}])[0].get("finish_reason") in ("stop", "length")
            with lock:
                seen["completions"] += 1
                if not ok:
                    seen["completion_errors"].append(f"no answer: {out}")
        except Exception as e:  # any failure is the request's error, reported
            body = e.read().decode(errors="replace") if isinstance(e, urllib.error.HTTPError) else ""
            with lock:
                seen["completions"] += 1
                seen["completion_errors"].append(f"{type(e).__name__}: {e} {body}".strip())
            time.sleep(0.05)


def uploads():
    i = 0
    while not (DIR / "stop").exists():
        i += 1
        text = json.dumps({"prompt": f"file {i} =", "completion": f" {i}"}) + "\n"
        try:
            file = upload(f"roll-{i}.jsonl", text, start=i)
            with lock:
                seen["files"][file["id"]] = text
        except Exception as e:  # not acknowledged: it may or may not be there, as a client sees it
            body = e.read().decode(errors="replace") if isinstance(e, urllib.error.HTTPError) else ""
            with lock:
                seen["upload_errors"].append(f"{type(e).__name__}: {e} {body}".strip())
        time.sleep(0.05)


def start():
    DIR.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"prompt": f"n{i} =", "completion": f" {i % 3}"}) + "\n" for i in range(128))
    file = upload("roll-train.jsonl", lines)
    job = call("POST", "/v1/fine_tuning/jobs", {
        "model": "base", "training_file": file["id"], "suffix": "roll",
        "hyperparameters": {"n_epochs": 100, "batch_size": 4, "checkpoint_every": 50},
    })
    (DIR / "started").write_text(job["id"])
    threads = [threading.Thread(target=completions, args=(w,)) for w in range(2)] + [threading.Thread(target=uploads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (DIR / "results.json").write_text(json.dumps(seen))


def check():
    results = json.loads((DIR / "results.json").read_text())
    job_id = (DIR / "started").read_text()
    deadline = time.time() + 300
    job = call("GET", f"/v1/fine_tuning/jobs/{job_id}")
    while job["status"] not in ("succeeded", "failed", "cancelled") and time.time() < deadline:
        time.sleep(1)
        job = call("GET", f"/v1/fine_tuning/jobs/{job_id}")
    events, after = [], ""
    while True:
        page = call("GET", f"/v1/fine_tuning/jobs/{job_id}/events?limit=100&order=asc{after}")
        events += [e["message"] for e in page["data"]]
        if not page.get("has_more"):
            break
        after = f"&after={page['data'][-1]['id']}"
    lost = []
    for file_id, text in results["files"].items():
        try:
            meta = call("GET", f"/v1/files/{file_id}")
            assert meta["id"] == file_id
        except Exception as e:
            lost.append(f"{file_id}: {e}")
    total, errors = results["completions"], results["completion_errors"]
    handed = [m for m in events if "handed off" in m]
    print(f"rolling upgrade: {total} completions during the roll, {len(errors)} errors "
          f"({100 * len(errors) / max(total, 1):.2f}%), {results['moved']} calls moved to another gateway; "
          f"{len(results['files'])} uploads acknowledged, {len(lost)} lost ({len(results['upload_errors'])} not "
          f"acknowledged); the job {job['status']} after {job.get('attempts')} attempts, {len(handed)} hand-offs")
    for e in errors[:5]:
        print(f"  completion error: {e}")
    for e in results["upload_errors"][:5]:
        print(f"  upload not acknowledged: {e}")
    failures = [f"acknowledged file lost: {x}" for x in lost]
    if job["status"] != "succeeded":
        failures.append(f"the job ended {job['status']}: {job.get('error')}; events: {events[-10:]}")
    if not results["files"] or not total:
        failures.append("the workload did nothing")
    for f in failures:
        print(f"FAIL {f}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    {"start": start, "check": check}[sys.argv[1]]()
