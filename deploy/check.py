#!/usr/bin/env python3
"""Checks every deployment file against the Kubernetes schemas and against the binary itself.

    deploy/check.py TANDEM        (deploy/check.sh makes the virtual environment and runs it)

1. Kubernetes (deploy/k8s): every manifest the kustomization lists, and only those, validates
   strictly (unknown fields refused) against the Kubernetes schemas of `kubernetes-validate`; the
   ServiceMonitors against the fields of the Prometheus Operator's CRD they use.
2. Every process the files start (the containers of the manifests, the container images' commands,
   the systemd units' ExecStart), with the config file, the TANDEM_* variables and the flags it is
   given there, is checked by the binary: `tandem config check FILE --process P -- FLAGS`. Every
   TANDEM_* variable a file sets must be one of that process's flags' (or TANDEM_API_KEY), and
   every health check must probe the process's own --health port.
3. The systemd units pass `systemd-analyze verify` with nothing to say.
4. Every alert rule (deploy/observability/alerts.yml) is complete, asks only for series the
   processes export, and is explained in docs/operator-guide.md.

Any failure is printed and the script exits 1.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
FAILURES = []
# What the per-pod variables stand for when a manifest's command is checked.
POD = {"POD_IP": "10.1.2.3", "POD_NAME": "tandem-worker-gpu-0"}
# Secrets the processes read from the environment rather than a flag.
SECRET_VARIABLES = {"TANDEM_API_KEY"}


def fail(where, message):
    FAILURES.append(f"{where}: {message}")
    print(f"FAIL {where}: {message}")


def ok(where, message):
    print(f"ok   {where}: {message}")


# -- Kubernetes schemas -------------------------------------------------------------------------

# The part of the Prometheus Operator's ServiceMonitor the manifests use, closed to other fields
# so that a misspelt one fails as kubernetes-validate's strict mode fails it.
SECRET_KEY = {
    "type": "object",
    "required": ["name", "key"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
}
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "tlsConfig": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "serverName": {"type": "string"},
                                    "ca": {"type": "object", "properties": {"secret": SECRET_KEY}, "additionalProperties": False},
                                    "cert": {"type": "object", "properties": {"secret": SECRET_KEY}, "additionalProperties": False},
                                    "keySecret": SECRET_KEY,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def validate(where, resource):
    if resource.get("kind") == "ServiceMonitor":
        jsonschema.validate(resource, SERVICE_MONITOR)
    else:
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)
    ok(where, f"{resource['kind']}/{resource['metadata']['name']} valid")


def kubernetes():
    k8s = DEPLOY / "k8s"
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in k8s.glob("*.yaml")} - {"kustomization.yaml"}
    if listed != present:
        fail("deploy/k8s/kustomization.yaml", f"lists {sorted(listed)}, the folder holds {sorted(present)}")
    resources = []
    for name in sorted(listed & present):
        for resource in yaml.safe_load_all((k8s / name).read_text()):
            where = f"deploy/k8s/{name}"
            try:
                validate(where, resource)
            except Exception as e:  # the validators' errors have no common base
                fail(where, f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}: {e}")
            resources.append((where, resource))
    # The strict check is a check: a field no schema has is refused.
    bad = json.loads(json.dumps(next(r for _, r in resources if r["kind"] == "StatefulSet")))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    try:
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)
        fail("kubernetes-validate", "a misspelt field passed the strict check")
    except kubernetes_validate.ValidationError:
        ok("kubernetes-validate", "a misspelt field is refused")
    return resources


# -- Processes and their flags ------------------------------------------------------------------


def flags_of(tandem, process):
    """The long flags (config keys) of `tandem PROCESS`, from its help."""
    out = subprocess.run([tandem, process, "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"^\s+(?:-\w, )?--([a-z0-9-]+)", out, re.M)) - {"help"}


def check_process(tandem, where, argv, config_text, env, host, health_port=None):
    """`argv` (the process's arguments, its config file given as --config PATH) checked by the
    binary with `config_text` as that file and `env` as its environment."""
    process, rest = argv[0], list(argv[1:])
    if process not in ("coordinator", "worker"):
        return fail(where, f"runs `tandem {process}`, not a coordinator or a worker")
    if "--config" not in rest:
        return fail(where, "gives no --config file")
    at = rest.index("--config")
    del rest[at : at + 2]
    known = {"TANDEM_" + f.upper().replace("-", "_") for f in flags_of(tandem, process)} | SECRET_VARIABLES
    for name in env:
        if name.startswith("TANDEM_") and name not in known:
            fail(where, f"sets {name}, which is no flag of `tandem {process}`")
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(config_text)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    command = [tandem, "config", "check", f.name, "--process", process, "--host", host, "--", *rest]
    result = subprocess.run(command, capture_output=True, text=True, env={**clean, **env, "RUST_BACKTRACE": "0"})
    os.unlink(f.name)
    if result.returncode != 0:
        return fail(where, f"`tandem {shlex.join(argv)}`: {result.stderr.strip()}")
    settings = result.stdout
    ok(where, settings.splitlines()[0].lstrip("# "))
    if health_port is not None:
        health = re.search(r'^health = "[^"]*:(\d+)"', settings, re.M)
        if not health or int(health.group(1)) != health_port:
            fail(where, f"its health check probes port {health_port}; the process answers on {health and health.group(0)}")
    return settings


def substitute(value, variables):
    """Kubernetes' `$(VAR)` references in a value."""
    return re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), value)


def manifests(tandem, resources):
    config = next(r for _, r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == "tandem-config")
    for where, r in resources:
        if r["kind"] != "StatefulSet":
            continue
        pod = r["spec"]["template"]["spec"]
        mounts_from = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            argv = c.get("command", []) + c.get("args", [])
            env, variables = {}, dict(POD)
            for e in c.get("env", []):
                value = substitute(e["value"], variables) if "value" in e else variables.get(e["name"], "from-a-secret")
                variables[e["name"]] = value
                env[e["name"]] = value
            # The config file is a key of the ConfigMap, mounted at the path --config names.
            path = argv[argv.index("--config") + 1] if "--config" in argv else None
            mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == path), None)
            volume = mounts_from.get(mount["name"]) if mount else None
            if not volume or volume.get("configMap", {}).get("name") != "tandem-config":
                fail(where, f"--config {path} is not mounted from the ConfigMap tandem-config")
                continue
            text = config["data"][mount["subPath"]]
            health = next((p["containerPort"] for p in c.get("ports", []) if p["name"] == "health"), None)
            probe = c.get("readinessProbe", {}).get("httpGet", {})
            if probe.get("port") != "health" or probe.get("path") != "/health":
                fail(where, "its readiness probe is not GET /health on the health port")
            host = f"{r['metadata']['name']}-0"
            check_process(tandem, f"{where} {c['name']}", argv[1:] if argv[0].endswith("tandem") else argv, text, env, host, health)


def host_variables(process):
    """The per-host variables of deploy/systemd/PROCESS.env, as /etc/tandem/PROCESS.env holds them."""
    lines = (DEPLOY / "systemd" / f"{process}.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def dockerfiles(tandem):
    systemd = DEPLOY / "systemd"
    for path in sorted((DEPLOY / "docker").glob("Dockerfile*")):
        where = str(path.relative_to(ROOT))
        text = path.read_text().replace("\\\n", " ")
        instruction = lambda name: re.search(rf"^{name}\s+(.*)$", text, re.M)
        entrypoint = json.loads(instruction("ENTRYPOINT").group(1))
        cmd = json.loads(instruction("CMD").group(1))
        if entrypoint != ["/usr/local/bin/tandem"] or not re.search(r"^COPY .*/tandem /usr/local/bin/tandem$", text, re.M):
            fail(where, f"its entrypoint {entrypoint} is not the tandem binary it copies")
        if not re.search(r"^USER (?!root)\w+", text, re.M):
            fail(where, "runs as root")
        if "VOLUME" not in text:
            fail(where, "declares no data volume")
        health = re.search(r"HEALTHCHECK .* CMD (\[.*\])", text)
        url = json.loads(health.group(1))[-1] if health else ""
        port = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/health", url)
        if not port:
            fail(where, f"its HEALTHCHECK probes {url!r}, not a /health port")
            continue
        exposed = {int(p) for p in re.search(r"^EXPOSE (.*)$", text, re.M).group(1).split()}
        if int(port.group(1)) not in exposed:
            fail(where, f"does not expose its health port {port.group(1)}")
        process = cmd[0]
        env = host_variables(process)
        check_process(tandem, where, cmd, (systemd / f"{process}.toml").read_text(), env, "docker", int(port.group(1)))


def units(tandem):
    systemd = DEPLOY / "systemd"
    for path in sorted(systemd.glob("*.service")):
        where = str(path.relative_to(ROOT))
        text = path.read_text()
        exec_start = re.search(r"^ExecStart=(.*)$", text, re.M).group(1)
        argv = shlex.split(exec_start)
        if argv[0] != "/usr/local/bin/tandem":
            fail(where, f"ExecStart runs {argv[0]}, not /usr/local/bin/tandem")
            continue
        process = argv[1]
        config = argv[argv.index("--config") + 1]
        if config != f"/etc/tandem/{process}.toml":
            fail(where, f"reads {config}, not /etc/tandem/{process}.toml (deploy/systemd/{process}.toml)")
        env_file = re.search(r"^EnvironmentFile=-?(.*)$", text, re.M).group(1)
        if env_file != f"/etc/tandem/{process}.env":
            fail(where, f"takes its variables from {env_file}, not /etc/tandem/{process}.env")
        env = host_variables(process)
        check_process(tandem, where, argv[1:], (systemd / f"{process}.toml").read_text(), env, "host-1")
        for setting in ["NoNewPrivileges=yes", "ProtectSystem=strict", "Restart=on-failure", "User=tandem"]:
            if setting not in text.splitlines():
                fail(where, f"lacks {setting}")
        # systemd-analyze verify wants the program where ExecStart says: it reads a copy that
        # runs the binary under test; it must have nothing to say.
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / path.name
            copy.write_text(text.replace("/usr/local/bin/tandem", str(Path(tandem).resolve())))
            result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
            said = (result.stdout + result.stderr).strip()
            if result.returncode != 0 or said:
                fail(where, f"systemd-analyze verify: {said or result.returncode}")
            else:
                ok(where, "systemd-analyze verify: clean")


def alerts():
    where = "deploy/observability/alerts.yml"
    rules = [r for g in yaml.safe_load((DEPLOY / "observability/alerts.yml").read_text())["groups"] for r in g["rules"]]
    # The series the processes export: every name their sources register.
    sources = "".join(p.read_text() for d in ["coordinator", "worker", "proto"] for p in (ROOT / d / "src").rglob("*.rs"))
    exported = set(re.findall(r'"(tandem:[a-z_]+)"', sources))
    guide = (ROOT / "docs/operator-guide.md").read_text()
    for r in rules:
        name = r.get("alert", "?")
        missing = [k for k in ("alert", "expr", "labels", "annotations") if k not in r]
        if missing or "severity" not in r.get("labels", {}) or "summary" not in r.get("annotations", {}):
            fail(where, f"{name}: lacks {missing or 'a severity or a summary'}")
        for series in re.findall(r"tandem:[a-z_]+", r.get("expr", "")):
            if series.removesuffix("_total") not in exported:
                fail(where, f"{name}: asks for {series}, which no process exports")
        if f"`{name}`" not in guide:
            fail(where, f"{name} is not explained in docs/operator-guide.md")
    ok(where, f"{len(rules)} alerts, each over exported series and explained in the guide")


def main():
    tandem = sys.argv[1]
    resources = kubernetes()
    manifests(tandem, resources)
    dockerfiles(tandem)
    units(tandem)
    alerts()
    if FAILURES:
        print(f"\n{len(FAILURES)} deployment check(s) failed:", *FAILURES, sep="\n  ")
        sys.exit(1)
    print("\nevery deployment file checked")


if __name__ == "__main__":
    main()
