"""The deploy files: the Dockerfile (hadolint, and what it installs) and the Helm chart (helm lint, the
schema, kubernetes-validate of every rendered manifest, and the rendered objects against the code they run).

No Docker engine and no cluster exist here: the image is never built and the chart never installed. The
tools (helm 4, hadolint, kubernetes-validate) come from `make setup-deploy`.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import threading
from functools import cache
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import tomllib
import yaml
from conftest import run_cli

from observe_r1.errors import UserError
from observe_r1_eval.lmms import PYTHON_ENV
from observe_r1_serve import healthcheck
from observe_r1_serve.app import create_app
from observe_r1_serve.cli import API_KEY_ENV, add_server_arguments
from observe_r1_serve.config import ServerConfig, check_vllm_options
from observe_r1_serve.engine import EngineStats
from observe_r1_serve.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / ".venv-deploy" / "bin"
CHART = REPO / "helm" / "observe-r1"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
# Both optional APIs the chart renders objects for; a plain cluster has neither (tested apart).
CRD_APIS = ["monitoring.coreos.com/v1/ServiceMonitor", "keda.sh/v1alpha1/ScaledObject"]
CRD_GROUPS = {api.split("/")[0] for api in CRD_APIS}
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ["1.29.0", "1.37.0"]

pytestmark = pytest.mark.skipif(
    not (TOOLS / "helm").exists(), reason="the deploy tools are not installed: run `make setup-deploy`"
)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(TOOLS / "helm"), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


@cache
def render(values: str | None = None, *sets: str, apis: tuple[str, ...] = tuple(CRD_APIS)) -> str:
    args = ["template", "rel", str(CHART), "--namespace", "ns"]
    args += ["-f", values] if values else []
    for s in sets:
        args += ["--set", s]
    for api in apis:
        args += ["--api-versions", api]
    return helm(*args).stdout


def objects(values: str | None = None, *sets: str, apis: tuple[str, ...] = tuple(CRD_APIS)) -> dict:
    """The rendered objects by (kind, name)."""
    docs = [d for d in yaml.safe_load_all(render(values, *sets, apis=apis)) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def example(name: str) -> str:
    return str(CHART / "examples" / f"{name}.yaml")


def pod_specs(objs: dict) -> list[dict]:
    specs = [o["spec"]["template"]["spec"] for o in objs.values() if o["kind"] in ("Deployment", "Job")]
    return specs + [o["spec"] for o in objs.values() if o["kind"] == "Pod"]


def container(objs: dict, kind: str, name: str, index: int = 0) -> dict:
    return objs[(kind, name)]["spec"]["template"]["spec"]["containers"][index]


# --- the Dockerfile ---------------------------------------------------------------------------------------


def copied(steps: list[tuple[str, str]]) -> set[str]:
    """What the COPY instructions among `steps` take from the build context (not from another stage)."""
    return {src.rstrip("/") for k, a in steps if k == "COPY" and "--from" not in a for src in a.split()[:-1]}


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments left out."""
    lines = [
        line for line in (REPO / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_hadolint_finds_nothing_and_every_ignored_rule_is_justified():
    proc = subprocess.run(
        [str(TOOLS / "hadolint"), "--failure-threshold", "style", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (REPO / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if match := re.match(r"# hadolint ignore=(.+)", line):
            for rule in match.group(1).split(","):
                assert rule in lines[i - 1] or rule in lines[i - 2], (
                    f"line {i + 1}: {rule} ignored without a reason"
                )


def test_every_install_in_the_image_comes_from_a_hashed_lock():
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    commands = [c.strip() for run in runs for c in re.split(r"&&|;|\bdo\b|\bdone\b", run)]
    installs = [c for c in commands if re.search(r"\bpip (install|sync)\b", c)]
    assert len(installs) == 4, installs  # uv; the two environments; the project
    for command in installs:
        words = shlex.split(command)
        if words[-1] == ".":  # the project itself, without dependencies; its build tools are locked
            assert "--no-deps" in words and "locks/build.lock.txt" in words, command
        else:
            assert "--require-hashes" in words, command
    named = set(re.findall(r"locks/([\w-]+\.lock\.txt)", " ".join(runs)))
    expected = {"tools", "build", "main-cuda", "image-cpu", "image-eval"}
    assert named == {f"{name}.lock.txt" for name in expected}
    assert all((REPO / "locks" / lock).exists() for lock in named)


def test_the_dependencies_are_installed_before_the_sources_are_copied():
    """A source change reruns only the project's own install, not the environments'."""
    steps = instructions()
    sync = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "pip sync" in a)
    assert copied(steps[:sync]) == {"locks"}
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {"observe_r1", *packages.values(), "pyproject.toml", "README.md"} <= copied(steps[sync:])


def test_the_build_context_holds_what_the_dockerfile_copies():
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert copied(instructions()) == allowed


def test_the_entrypoint_is_the_console_script_and_eval_finds_lmms_eval():
    steps = instructions()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = json.loads(next(a for k, a in steps if k == "ENTRYPOINT"))
    assert entrypoint == ["observe-r1"] and scripts["observe-r1"] == "observe_r1.cli:main"
    env = " ".join(a for k, a in steps if k == "ENV")
    assert "PATH=/opt/venv/bin:" in env
    assert f"{PYTHON_ENV}=/opt/venv-eval/bin/python" in env
    assert any(k == "RUN" and "uv venv --python" in a and "/opt/venv-eval" in a for k, a in steps)
    healthcheck_cmd = json.loads(next(a for k, a in steps if k == "HEALTHCHECK").split("CMD", 1)[1])
    assert healthcheck_cmd == ["python", "-m", "observe_r1_serve.healthcheck"]
    user = next(a for k, a in reversed(steps) if k == "USER")
    assert user == "10001"


# --- the image's health check ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, url",
    [
        (
            ["/opt/venv/bin/python", "/opt/venv/bin/observe-r1", "serve", "--model", "/m"],
            "http://127.0.0.1:8000/health",
        ),
        (
            ["observe-r1", "serve", "--model=/m", "--host", "0.0.0.0", "--port=9001"],
            "http://127.0.0.1:9001/health",
        ),
        (
            ["python", "-m", "observe_r1.cli", "serve", "--host", "10.1.2.3", "--port", "80"],
            "http://10.1.2.3:80/health",
        ),
        (["observe-r1", "serve", "--host", "::1"], "http://[::1]:8000/health"),
        (["observe-r1", "train", "--config", "c.yaml"], None),
        (["observe-r1", "--help"], None),
        (["/bin/sh", "-c", "sleep 1"], None),
    ],
)
def test_the_health_check_probes_only_a_server(argv, url):
    assert healthcheck.health_url(argv) == url


def test_the_health_check_calls_the_servers_health_route(tmp_path):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == healthcheck.HEALTH_PATH else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    cmdline = tmp_path / "cmdline"
    try:
        cmdline.write_bytes(b"\0".join([b"observe-r1", b"serve", b"--port", str(httpd.server_port).encode()]))
        assert healthcheck.main(cmdline) == 0
    finally:
        httpd.shutdown()
    assert healthcheck.main(cmdline, timeout_s=1) == 1  # nothing listens there any more
    cmdline.write_bytes(b"observe-r1\0train\0--config\0c.yaml")
    assert healthcheck.main(cmdline) == 0


# --- the chart: tools --------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: "defaults" if v is None else Path(v).stem)
def test_helm_lint_strict(values):
    proc = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []), check=False)
    assert proc.returncode == 0 and "0 chart(s) failed" in proc.stdout, proc.stdout + proc.stderr


def kubernetes_validate(kube_version: str, files: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TOOLS / "kubernetes-validate"), "--strict", "-k", kube_version, *files],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_rendered_manifest_is_valid_kubernetes(kube_version, tmp_path):
    """kubernetes-validate --strict (unknown fields refused) on the defaults and every example."""
    files, count = [], 0
    for values in [None, *EXAMPLES]:
        path = tmp_path / f"{'defaults' if values is None else values.stem}.yaml"
        docs = [d for d in yaml.safe_load_all(render(str(values) if values else None)) if d]
        # The custom resources have no schema here; their fields are checked in the tests below.
        docs = [d for d in docs if d["apiVersion"].split("/")[0] not in CRD_GROUPS]
        path.write_text(yaml.safe_dump_all(docs))
        files.append(str(path))
        count += len(docs)
    proc = kubernetes_validate(kube_version, files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" passed for resource ") == count > 50, proc.stdout
    # The validator refuses what the cluster would: a field that Kubernetes does not have.
    bad = yaml.safe_load_all(render())
    deployment = next(d for d in bad if d and d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(deployment))
    proc = kubernetes_validate(kube_version, [str(tmp_path / "bad.yaml")])
    assert proc.returncode != 0 and "gpus" in proc.stdout + proc.stderr


def test_every_example_is_rendered_and_the_chart_packages_without_them(tmp_path):
    assert {e.stem for e in EXAMPLES} >= {
        "cpu-tiny",
        "gpu-1",
        "tp4",
        "autoscaling",
        "keda",
        "train-multinode",
        "eval-job",
        "ladder-job",
    }
    helm("package", str(CHART), "--destination", str(tmp_path))
    listing = subprocess.run(
        ["tar", "tzf", str(next(tmp_path.glob("*.tgz")))], capture_output=True, text=True
    ).stdout
    assert "observe-r1/values.schema.json" in listing and "examples/" not in listing


def test_the_readme_explains_every_top_level_value():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### The chart") : readme.index("## CPU and GPU")]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(values) == set(schema["properties"]) - {"global"}
    assert [key for key in values if f"`{key}" not in section] == []


# --- the chart: the server against the code it runs ------------------------------------------------------


def serve_args(objs: dict) -> argparse.Namespace:
    """The server container's arguments, parsed by `observe-r1 serve`'s own parser (unknown flags fail)."""
    args = container(objs, "Deployment", "rel-observe-r1")["args"]
    assert args[0] == "serve"
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_server_arguments(parser)
    return parser.parse_args(args[1:])


def test_probes_use_the_servers_own_routes_and_port():
    objs = objects()
    routes = {r.path for r in create_app(ServerConfig(model=Path("m")), lambda c: None).routes}
    c = container(objs, "Deployment", "rel-observe-r1")
    assert c["startupProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": healthcheck.HEALTH_PATH, "port": "http"}
    assert {"/ready", "/health", "/metrics"} <= routes
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    args = serve_args(objs)
    assert args.port == port == ServerConfig.port and args.host == "0.0.0.0"
    assert objs[("Service", "rel-observe-r1")]["spec"]["ports"][0]["targetPort"] == "http"
    # Half an hour for a model load before the liveness probe may restart the pod.
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 1800


@pytest.mark.parametrize(
    "name, gpus, tensor_parallel",
    [("cpu-tiny", 0, None), ("gpu-1", 1, None), ("tp4", 4, 4), ("autoscaling", 1, None)],
)
def test_gpu_requests_limits_and_vllm_arguments(name, gpus, tensor_parallel):
    objs = objects(example(name))
    resources = container(objs, "Deployment", "rel-observe-r1")["resources"]
    for part in ("requests", "limits"):
        assert resources[part].get("nvidia.com/gpu", 0) == gpus
    args = serve_args(objs)
    assert args.tensor_parallel_size == (tensor_parallel or ServerConfig.tensor_parallel_size)
    spec = objs[("Deployment", "rel-observe-r1")]["spec"]
    # Spare GPUs rarely exist: a rollout never runs the old and the new pod side by side.
    strategy = spec["strategy"]
    assert strategy["type"] == "Recreate" or strategy["rollingUpdate"]["maxSurge"] == 0


def test_vllm_engine_arguments_reach_the_server():
    args = serve_args(objects(example("tp4")))
    assert (args.engine, args.gpu_memory_utilization, args.max_model_len, args.max_num_seqs) == (
        "vllm",
        0.92,
        32768,
        128,
    )
    assert json.loads(args.vllm_engine_args) == {"enable_chunked_prefill": True}


def test_the_cpu_example_builds_the_tiny_model_and_serves_it_with_transformers():
    objs = objects(example("cpu-tiny"))
    spec = objs[("Deployment", "rel-observe-r1")]["spec"]["template"]["spec"]
    init = spec["initContainers"][0]
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert "observe-r1 tiny-model" in init["command"][-1] and env["MODEL_DIR"] == "/data/models/tiny"
    args = serve_args(objs)
    assert args.engine == "transformers" and str(args.model) == "/data/models/tiny"
    assert spec["containers"][0]["image"] == "observe-r1:0.1.0-cpu"


def test_every_pod_runs_restricted():
    for values in [None, *EXAMPLES]:
        for spec in pod_specs(objects(str(values) if values else None)):
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert spec["automountServiceAccountToken"] is False
            for c in spec["containers"] + spec.get("initContainers", []):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
                assert sc["readOnlyRootFilesystem"] is True
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                # A read-only root leaves these writable: the model volume, /tmp and $HOME (caches).
                assert c["name"] == "health" or {"/data", "/tmp", "/home/observe"} <= mounts, c["name"]


def test_the_autoscaler_scales_on_the_gauge_the_server_exports():
    exported = Metrics().render(EngineStats()).decode()
    hpa = objects(example("autoscaling"))[("HorizontalPodAutoscaler", "rel-observe-r1")]
    name = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert f"# TYPE {name} gauge" in exported and "waiting" in name
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "rel-observe-r1",
    }
    assert "replicas" not in objects(example("autoscaling"))[("Deployment", "rel-observe-r1")]["spec"]
    keda = objects(example("keda"))[("ScaledObject", "rel-observe-r1")]
    trigger = keda["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["query"].startswith(f"sum({name}{{")
    assert keda["spec"]["scaleTargetRef"]["name"] == "rel-observe-r1"


def test_the_service_monitor_scrapes_metrics_and_needs_its_api():
    monitor = objects(example("autoscaling"))[("ServiceMonitor", "rel-observe-r1")]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = objects()[("Service", "rel-observe-r1")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # A cluster without the Prometheus Operator: nothing to install that it would refuse.
    assert ("ServiceMonitor", "rel-observe-r1") not in objects(example("autoscaling"), apis=())
    proc = helm("template", "rel", str(CHART), "-f", example("keda"), check=False)
    assert proc.returncode != 0 and "needs KEDA" in proc.stderr


def test_the_multinode_training_job_is_an_indexed_torchrun():
    objs = objects(example("train-multinode"))
    job = objs[("Job", "rel-observe-r1-train")]
    service = objs[("Service", "rel-observe-r1-train")]
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    c = pod["containers"][0]
    assert c["command"] == ["python", "-m", "torch.distributed.run"]
    args = c["args"]
    assert {"--nnodes=2", "--nproc-per-node=8", "--node-rank=$(NODE_RANK)", "--master-port=29500"} <= set(
        args
    )
    # Pod 0 of an Indexed Job is <job>-0, reachable as <job>-0.<subdomain>.
    assert "--master-addr=rel-observe-r1-train-0.rel-observe-r1-train" in args
    rank = next(e for e in c["env"] if e["name"] == "NODE_RANK")
    assert (
        rank["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert args[args.index("-m") + 1 :][:2] == ["observe_r1.cli", "train"]
    assert ("Deployment", "rel-observe-r1") not in objs


def test_the_single_node_training_job_runs_the_train_cli():
    from observe_r1_train.cli import add_arguments

    objs = objects(example("everything"))
    c = container(objs, "Job", "rel-observe-r1-sft")
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    assert c["args"][0] == "sft"
    args = parser.parse_args(c["args"][1:])
    assert args.nproc == 4 and str(args.config) == "/etc/observe-r1/train.yaml"
    config = yaml.safe_load(objs[("ConfigMap", "rel-observe-r1-sft")]["data"]["train.yaml"])
    assert config["checkpoint"]["output_dir"] == "/data/runs/sft"
    assert "completionMode" not in objs[("Job", "rel-observe-r1-sft")]["spec"]


def ladder_args(objs: dict) -> argparse.Namespace:
    from observe_r1_train.ladder.cli import add_arguments

    c = container(objs, "Job", "rel-observe-r1-ladder")
    assert c["args"][0] == "ladder"
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    return parser.parse_args(c["args"][1:])


def test_the_ladder_job_samples_through_the_release_service_or_in_its_pod():
    objs = objects(example("ladder-job"))
    args = ladder_args(objs)
    assert (args.data, str(args.out), args.preset) == (
        [Path("/data/datasets/rows.jsonl")],
        "/data/ladder",
        "neuraladder",
    )
    assert (args.server, args.server_model, args.model) == (
        "http://rel-observe-r1:8000/v1",
        "observe-r1",
        None,
    )
    assert args.map == "question=problem,answer=solution" and args.overrides == ["smoothing.width=1"]
    pod = objs[("Job", "rel-observe-r1-ladder")]["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["command"][-1] == "http://rel-observe-r1:8000/ready"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env[API_KEY_ENV]["valueFrom"]["secretKeyRef"]["name"] == "observe-r1-api-key"
    # A reference model in the pod: no server to wait for, the GPUs it asked for.
    objs = objects(example("everything"))
    args = ladder_args(objs)
    assert (args.model, args.server, args.preset, args.samples) == (
        "/data/models/reference",
        None,
        "difficulty-prior",
        16,
    )
    pod = objs[("Job", "rel-observe-r1-ladder")]["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_eval_job_runs_the_eval_cli_against_the_release_service():
    from observe_r1_eval.run import run_parser

    objs = objects(example("eval-job"))
    c = container(objs, "Job", "rel-observe-r1-eval")
    assert c["args"][0] == "eval"
    args = run_parser().parse_args(c["args"][1:])
    assert (args.suite, args.model, args.limit) == ("reasoning", "observe-r1", 500)
    assert args.base_url == "http://rel-observe-r1:8000/v1" and str(args.output).startswith("/data/")
    init = objs[("Job", "rel-observe-r1-eval")]["spec"]["template"]["spec"]["initContainers"][0]
    assert init["command"][-1] == "http://rel-observe-r1:8000/ready"


def test_secrets_are_referenced_not_inlined():
    objs = objects(example("gpu-1"))
    env = {e["name"]: e for e in container(objs, "Deployment", "rel-observe-r1")["env"]}
    assert env[API_KEY_ENV]["valueFrom"]["secretKeyRef"] == {"name": "observe-r1-api-key", "key": "api-key"}
    init_env = {
        e["name"]: e
        for e in objs[("Deployment", "rel-observe-r1")]["spec"]["template"]["spec"]["initContainers"][0][
            "env"
        ]
    }
    assert init_env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
    assert not [o for o in objs.values() if o["kind"] == "Secret"]
    # A key given as a value lands in a Secret of the chart, and the server reads it from there.
    objs = objects(example("everything"))
    secret = objs[("Secret", "rel-observe-r1-api-key")]
    env = {e["name"]: e for e in container(objs, "Deployment", "rel-observe-r1")["env"]}
    assert env[API_KEY_ENV]["valueFrom"]["secretKeyRef"] == {
        "name": "rel-observe-r1-api-key",
        "key": "api-key",
    }
    assert "not-a-real-key" not in render(example("everything")).replace(secret["data"]["api-key"], "")
    # No key configured: the server takes none, and no variable names an absent Secret.
    assert API_KEY_ENV not in {e["name"] for e in container(objects(), "Deployment", "rel-observe-r1")["env"]}


def test_the_network_policy_opens_the_server_port_dns_and_the_hub():
    policy = objects(example("everything"))[("NetworkPolicy", "rel-observe-r1")]["spec"]
    assert policy["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    egress_ports = [p["port"] for rule in policy["egress"] for p in rule.get("ports", [])]
    assert egress_ports == [53, 53, 443]  # 443: everything.yaml downloads its model from the Hub


def test_extra_objects_are_rendered_as_templates():
    notes = objects(example("everything"))[("ConfigMap", "rel-observe-r1-notes")]
    assert notes["data"] == {"release": "rel"}


def test_the_helm_test_pod_calls_health_through_the_service():
    pod = objects()[("Pod", "rel-observe-r1-test-health")]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["containers"][0]["args"] == ["http://rel-observe-r1:8000/health"]


def test_notes_give_the_exact_calls():
    proc = helm(
        "install", "rel", str(CHART), "--dry-run=client", "--namespace", "ns", "-f", example("everything")
    )
    assert "kubectl -n ns port-forward service/rel-observe-r1 8000:8000" in proc.stdout
    assert "get secret rel-observe-r1-api-key" in proc.stdout
    assert '"model": "observe-r1"' in proc.stdout and "openai.OpenAI(base_url=" in proc.stdout


# --- the server options the chart drives (vLLM's engine arguments) ---------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tensor_parallel_size": 0}, "--tensor-parallel-size must be at least 1, not 0"),
        ({"gpu_memory_utilization": 1.2}, "--gpu-memory-utilization must be in (0, 1], not 1.2"),
        ({"max_num_seqs": 0}, "--max-num-seqs must be at least 1"),
        ({"vllm_engine_args": "{bad"}, "--vllm-engine-args is not JSON"),
        ({"vllm_engine_args": "[1]"}, "--vllm-engine-args must be a JSON object, not list"),
    ],
)
def test_bad_vllm_options_are_refused(options, message):
    with pytest.raises(UserError) as info:
        check_vllm_options(ServerConfig(model=Path("m"), **options))
    assert str(info.value) == message or str(info.value).startswith(message)


def test_the_server_refuses_them_before_a_model_loads(tiny_model_dir):
    proc = run_cli("serve", "--model", str(tiny_model_dir), "--gpu-memory-utilization", "0", check=False)
    assert proc.returncode == 2 and "--gpu-memory-utilization must be in (0, 1], not 0.0" in proc.stderr
    assert check_vllm_options(ServerConfig(model=Path("m"), vllm_engine_args='{"seed": 1}')) == {"seed": 1}


# --- the chart: refused values ---------------------------------------------------------------------------


def assert_refused(sets: list[str], message: str) -> None:
    """`helm template` with these --set values fails, saying `message`."""
    proc = helm("template", "rel", str(CHART), *(arg for s in sets for arg in ("--set", s)), check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "sets, message",
    [
        (["server.gpus=two"], "at '/server/gpus': got string, want integer"),
        (["bogus=1"], "additional properties 'bogus' not allowed"),
        (["server.bogus=1"], "at '/server': additional properties 'bogus' not allowed"),
        (["server.engine=tgi"], "at '/server/engine'"),
        (["server.engine=vllm", "server.gpus=0"], "at '/server/gpus'"),
        (
            ["server.engine=transformers", "server.vllm.tensorParallelSize=2"],
            "at '/server/vllm/tensorParallelSize'",
        ),
        (["server.vllm.gpuMemoryUtilization=1.5"], "at '/server/vllm/gpuMemoryUtilization'"),
        (["model.fetch=hub"], "at '/model/hubId'"),
        (["apiKey.existingSecret=a", "apiKey.value=b"], "at '/apiKey'"),
        (["train.enabled=true", "train.nodes=2", "train.configPath=/data/c.yaml"], "at '/data/accessModes'"),
        (["train.enabled=true", "train.nodes=2", "data.type=emptyDir"], "at '/data/type'"),
        (["train.nodes=0"], "at '/train/nodes'"),
        (["train.overrides[0]=--lr"], "at '/train/overrides/0'"),
        (["eval.suite=mmmu"], "at '/eval/suite'"),
        (["ladder.preset=easy"], "at '/ladder/preset'"),
        (["ladder.server=host:8000"], "at '/ladder/server'"),
        (["data.type=hostPath"], "at '/data/hostPath'"),
    ],
)
def test_the_schema_refuses_bad_values_naming_the_key(sets, message):
    assert_refused(sets, message)


@pytest.mark.parametrize(
    "sets, message",
    [
        (
            ["server.gpus=2", "server.vllm.tensorParallelSize=4"],
            "server.vllm.tensorParallelSize (4) needs as many GPUs",
        ),
        (
            ["autoscaling.enabled=true", "autoscaling.minReplicas=5", "autoscaling.maxReplicas=2"],
            "above autoscaling.maxReplicas",
        ),
        (["train.enabled=true"], "train.enabled needs a config"),
        (["ladder.enabled=true", "ladder.out=/data/l"], "ladder.enabled needs ladder.data"),
    ],
)
def test_the_templates_refuse_what_the_schema_cannot_express(sets, message):
    assert_refused(sets, message)
