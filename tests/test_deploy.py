"""The cluster as code (deploy/), judged offline: each file by the tool made for it (deploy/validate.py), and
together: one image and one token across the RayCluster and the controller, the GPU pool's labels and taint in
CloudFormation and Terraform equal to what the worker group selects, the controller's flags accepted by the real
CLI, alerts over metrics the code exports, and the demo release's Serve config, rendered by the controller's own
code with the Deployment's flags, accepted by Ray's schema. Each validator is also given broken copies to refuse.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import typing
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from deploy import validate

ROOT = Path(__file__).resolve().parent.parent
K8S, CFN, TF = ROOT / "deploy" / "kubernetes", ROOT / "deploy" / "aws" / "gpu-nodegroup.yaml", ROOT / "deploy" / "terraform" / "gpu-node-pool"
DIGEST_REF = re.compile(r"^[a-z0-9.-]+(?::\d+)?(?:/[a-z0-9._-]+)+@sha256:[0-9a-f]{64}$")
EFFECTS = {"NO_SCHEDULE": "NoSchedule", "NO_EXECUTE": "NoExecute", "PREFER_NO_SCHEDULE": "PreferNoSchedule"}


def one(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in validate.manifests(K8S).values() if d["kind"] == kind]
    return doc


def controller_container() -> dict[str, Any]:
    return typing.cast(dict[str, Any], one("Deployment")["spec"]["template"]["spec"]["containers"][0])


def controller_args() -> dict[str, str]:
    args = controller_container()["args"]
    return {a: b for a, b in zip(args, [*args[1:], ""], strict=True) if a.startswith("--")}


def broken(doc: Any, path: str, value: Any) -> Any:
    """A deep copy of `doc` with the value at a dotted path (list indexes as numbers) replaced or added."""
    out = copy.deepcopy(doc)
    *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
    target = out
    for key in parents:
        target = target[key]
    target[last] = value
    return out


def copied(tmp_path: Path, source: Path, name: str, edits: dict[str, str]) -> Path:
    """A copy of a file or folder under tmp_path with text edits in `name` (each old text must be there)."""
    target = tmp_path / source.name
    shutil.copytree(source, target) if source.is_dir() else shutil.copy(source, target)
    edited = target / name if source.is_dir() else target
    text = edited.read_text()
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new)
    edited.write_text(text)
    return target


@cache
def exported_metrics() -> dict[str, set[str]]:
    """Series name -> label names, for every metric the controller and the replicas export."""
    from controller.metrics import ControllerMetrics
    from serving.metrics import serving_metrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    out = {"up": {"job", "namespace", "instance"}}
    for m in vars(ControllerMetrics()).values():
        if hasattr(m, "_labelnames"):
            out |= {m._name + s: set(m._labelnames) | {"le"} for s in suffixes[m._type]}
    for m in serving_metrics().values():
        out |= {f"ray_{m.info['name']}{s}": {*m.info["tag_keys"], "le"} for s in suffixes[type(m).__name__.lower()]}
    return out


def rendered_demo() -> dict[str, Any]:
    """releases/demo.yaml through the real loader and renderer, with the settings the Deployment's flags give."""
    from controller.apply.model_store import Placement
    from controller.apply.ray_cluster import is_local
    from controller.apply.serve_config import RenderSettings, render
    from controller.parse.loader import parse_release
    from controller.plan.versions import version_id
    from controller.state.records import ReleaseRecord, VersionRecord
    from serving.code_pin import fingerprint

    args = controller_args()
    release = parse_release((ROOT / "releases" / "demo.yaml").read_bytes(), "releases/demo.yaml")
    version = VersionRecord("demo", version_id(release), "stable", 100, "ready", "c1", release.spec, 1.0)
    record = ReleaseRecord("demo", "Healthy", "", "c1", version.version, release.spec, 1.0)
    settings = RenderSettings(repo=f"{args['--state-dir']}/repo", cache_dir=f"{args['--state-dir']}/models", http_host=args["--http-host"],
                              placement=Placement(args["--model-store"], is_local(args["--ray-address"])),
                              proxy_location=typing.cast(Any, args["--proxy-location"]), serving_code=fingerprint())
    return render([record], [version], settings)


# --- the files as they are -----------------------------------------------------------------------------------------

def test_every_manifest_validates_against_its_schema():
    objects = validate.manifests(K8S)
    assert {d["kind"] for d in objects.values()} >= {"Namespace", "RayCluster", "Deployment", "PersistentVolumeClaim", "Service",
                                                     "ServiceAccount", "ServiceMonitor", "PrometheusRule"}
    assert {key: validate.object_errors(doc) for key, doc in objects.items()} == {key: [] for key in objects}


def test_the_kustomization_lists_exactly_the_files_of_its_folder_in_one_namespace():
    assert validate.kustomization_errors(K8S) == []
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    assert namespace == one("Namespace")["metadata"]["name"]
    assert {d["metadata"].get("namespace") for d in validate.manifests(K8S).values() if d["kind"] != "Namespace"} == {namespace}


def test_alert_rules_are_promql_over_metrics_the_code_exports(tmp_path):
    groups = one("PrometheusRule")["spec"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"DiffopsReleaseDegraded", "DiffopsReleaseFailed", "DiffopsReconcileErrors", "DiffopsNoReconcile"}
    assert [e for r in rules for e in validate.rule_errors(r, exported_metrics())] == []
    if shutil.which("promtool"):  # the Makefile installs no promtool: the PromQL checks above are what always runs
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
        done = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_ray_cluster_runs_the_pinned_serving_image_with_token_auth():
    ray, image = one("RayCluster")["spec"], validate.load_yaml(ROOT / "releases" / "demo.yaml")["spec"]["runtime"]["image"]
    assert DIGEST_REF.match(image) and ray["rayVersion"] == metadata.version("ray")
    pods = [ray["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in ray["workerGroupSpecs"])]
    controller = one("Deployment")["spec"]["template"]["spec"]
    assert {c["image"] for p in [*pods, controller] for c in p["containers"]} == {image}  # one image: one serving code
    token = {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "diffops-ray-token", "key": "auth_token"}}}
    for env in [ray["autoscalerOptions"]["env"], *(c["env"] for p in pods for c in p["containers"])]:
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in env and token in env
    assert all({"name": "DIFFOPS_IMAGE_DIGEST", "value": image} in c["env"] for p in pods for c in p["containers"])
    (mount,) = [m for m in controller["containers"][0]["volumeMounts"] if m["name"] == "ray-token"]
    (volume,) = [v["secret"] for v in controller["volumes"] if v["name"] == "ray-token"]
    assert volume["secretName"] == "diffops-ray-token" and volume["items"][0]["key"] == "auth_token"
    env = {e["name"]: e.get("value") for e in controller_container()["env"]}
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == f"{mount['mountPath']}/{volume['items'][0]['path']}"


def test_gpu_workers_autoscale_serve_and_advertise_what_gates_ask_for():
    ray = one("RayCluster")
    (group,) = ray["spec"]["workerGroupSpecs"]
    assert ray["spec"]["enableInTreeAutoscaling"] is True and 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (worker,) = group["template"]["spec"]["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    advertised = json.loads(json.loads(group["rayStartParams"]["resources"]))  # Ray's quoted JSON string
    env = {e["name"]: e.get("value") for e in controller_container()["env"]}
    assert set(json.loads(env["DIFFOPS_GATE_RESOURCES"])) <= set(advertised)
    serve = validate.manifests(K8S)["Service/diffops-serve"]["spec"]
    assert serve["selector"] == {"ray.io/cluster": ray["metadata"]["name"], "ray.io/node-type": "worker"}
    assert serve["ports"][0]["targetPort"] in {p["name"] for p in worker["ports"]}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": serve["ports"][0]["targetPort"]}


def test_the_gpu_pool_matches_the_worker_group_in_cloudformation_and_terraform():
    (group,) = one("RayCluster")["spec"]["workerGroupSpecs"]
    pod, cfn, tf = group["template"]["spec"], validate.load_yaml(CFN), validate.tf_parse(TF)
    nodegroup = cfn["Resources"]["NodeGroup"]["Properties"]
    assert pod["nodeSelector"] == nodegroup["Labels"]
    assert pod["tolerations"] == [{"key": t["Key"], "operator": "Equal", "value": t["Value"], "effect": EFFECTS[t["Effect"]]}
                                  for t in nodegroup["Taints"]]
    local = {k: v for block in tf["main.tf"]["locals"] for k, v in block.items()}
    (node_group,) = [r["aws_eks_node_group"]["gpu"] for r in tf["main.tf"]["resource"] if "aws_eks_node_group" in r]
    assert node_group["labels"] == "${local.node_labels}" and pod["nodeSelector"] == local["node_labels"]
    assert node_group["taint"] == [{k: f"${{local.gpu_taint.{k}}}" for k in ("key", "value", "effect")}]
    taint = local["gpu_taint"]
    assert pod["tolerations"] == [{"key": taint["key"], "operator": "Equal", "value": taint["value"], "effect": EFFECTS[taint["effect"]]}]
    default = {k: v.get("default") for block in tf["variables.tf"]["variable"] for k, v in block.items()}
    assert group["maxReplicas"] <= min(cfn["Parameters"]["MaxSize"]["Default"], default["max_size"])  # one GPU worker a node
    assert cfn["Parameters"]["InstanceType"]["Default"] == default["instance_type"]
    policies = {p.rsplit("/", 1)[1] for p in cfn["Resources"]["NodeRole"]["Properties"]["ManagedPolicyArns"]}
    assert policies == set(local["node_policies"]) == {"AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy", "AmazonEC2ContainerRegistryReadOnly"}
    aws = tf["versions.tf"]["terraform"][0]["required_providers"][0]["aws"]
    assert aws["source"] == "hashicorp/aws" and re.fullmatch(r"~> \d+\.\d+", aws["version"])


def test_the_controller_runs_alone_on_its_volume_and_is_probed_on_its_metrics_port():
    deployment, args, container = one("Deployment"), controller_args(), controller_container()
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    (state,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert f"PersistentVolumeClaim/{state['persistentVolumeClaim']['claimName']}" in validate.manifests(K8S)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == state["name"]]
    assert Path(args["--state-dir"]).is_relative_to(mount["mountPath"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(args["--metrics-port"]) and args["--metrics-host"] == "0.0.0.0"
    assert all(container[p]["httpGet"] == {"path": "/metrics", "port": "metrics"} for p in ("startupProbe", "livenessProbe", "readinessProbe"))
    service, monitor = validate.manifests(K8S)["Service/diffops-controller"], one("ServiceMonitor")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": ports["metrics"], "targetPort": "metrics", "protocol": "TCP"}]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    head = one("RayCluster")
    head_ports = {p["name"]: p["containerPort"] for p in head["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert args["--ray-address"] == f"http://{head['metadata']['name']}-head-svc:{head_ports['dashboard']}"
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    assert {"limits", "requests"} <= set(container["resources"])
    assert pod["serviceAccountName"] == "diffops-controller" and pod["automountServiceAccountToken"] is False


def test_the_controller_command_is_one_the_cli_accepts():
    from controller.cli.operate import controller_run

    assert controller_container()["command"] == ["diffops", "controller", "run"]
    try:
        ctx = controller_run.make_context("run", list(controller_container()["args"]))
    except click.UsageError as err:
        pytest.fail(f"`diffops controller run` refuses the Deployment's args: {err.format_message()}")
    assert ctx.params["proxy_location"] == "EveryNode" and ctx.params["http_host"] == "0.0.0.0"


def test_the_demo_release_renders_a_serve_config_ray_accepts():
    config = rendered_demo()
    assert validate.serve_errors(config, strict=False) == []
    assert config["proxy_location"] == "EveryNode" and config["http_options"]["host"] == "0.0.0.0"
    (model,) = [a for a in config["applications"] if a["route_prefix"] is None]
    assert model["args"]["model"]["uri"].startswith(controller_args()["--model-store"])  # no path of the controller's disk


def test_the_rendered_serve_config_uses_only_fields_ray_reads():
    assert validate.serve_errors(rendered_demo()) == []


def test_terraform_and_cloudformation_pass_their_linters():
    assert validate.tf_errors(TF) == []
    assert validate.cfn_errors(CFN) == []


def test_the_validator_script_passes_deploy_checkov_included():
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "deploy/validate.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert {f"checkov {framework}: ok" for framework in ("terraform", "cloudformation", "kubernetes")} <= set(lines)
    assert "deploy/kubernetes RayCluster/diffops-ray: ok" in lines and len(lines) == 3 + len(validate.manifests(K8S)) + 3


# --- broken copies: each validator refuses them --------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "path", "value"), [
    ("Deployment", "spec.template.spec.containers.0.colour", "blue"),  # unknown field
    ("Deployment", "spec.replicas", "one"),  # wrong type
    ("PersistentVolumeClaim", "spec.accessModes", "ReadWriteOnce"),
    ("RayCluster", "spec.workerGroupSpecs.0.gpus", 1),
    ("RayCluster", "spec.headGroupSpec.template.spec.containers.0.resources.limit", {"cpu": "2"}),
    ("RayCluster", "spec.workerGroupSpecs.0.maxReplicas", "4"),
    ("RayCluster", "spec.enableInTreeAutoscaling", "yes"),
    ("ServiceMonitor", "spec.endpoints.0.intervall", "30s"),
    ("PrometheusRule", "spec.groups.0.rules.0.for", 5),
    ("PrometheusRule", "spec.groups.0.rules.0.expr", "sum(rate(diffops_reconciles_total[5m])"),
])
def test_schemas_refuse_a_broken_copy(kind, path, value):
    doc = one(kind)
    assert validate.object_errors(doc) == []
    assert validate.object_errors(broken(doc, path, value)) != []


@pytest.mark.parametrize(("expr", "why"), [
    ("sum(rate(diffops_reconciles_total[5m])", "unclosed"),
    ("rate(diffops_reconciles_total) > 0", "matrix"),
    ("max(diffops_release_phases) == 1", "nothing exports"),
    ('sum(rate(ray_diffops_requests_total{status="500"}[5m]))', "no label status"),
])
def test_promql_checks_refuse_broken_rules(expr, why):
    errors = validate.rule_errors({"alert": "Broken", "expr": expr}, exported_metrics())
    assert errors and why in errors[0]


def test_the_kustomization_check_refuses_an_unlisted_or_missing_file(tmp_path):
    unlisted = copied(tmp_path / "a", K8S, "kustomization.yaml", {"  - prometheusrule.yaml\n": ""})
    missing = copied(tmp_path / "b", K8S, "kustomization.yaml", {"  - prometheusrule.yaml\n": "  - prometheusrules.yaml\n"})
    assert validate.kustomization_errors(unlisted) == ["prometheusrule.yaml: not in kustomization.yaml"]
    assert validate.kustomization_errors(missing)[1].startswith("prometheusrules.yaml: listed in kustomization.yaml, not in")


@pytest.mark.parametrize("edit", [
    {"max_size     = var.max_size": "max_size     = var.max_size +"},  # syntax
    {"var.max_size": "var.max_nodes"},  # an undeclared variable
    *([{"  cluster_name    =": "  cluster_name ="}] if shutil.which("terraform") else []),  # formatting
])
def test_terraform_checks_refuse_a_broken_copy(tmp_path, edit):
    assert validate.tf_errors(copied(tmp_path, TF, "main.tf", edit)) != []


@pytest.mark.parametrize("edit", [{"      UpdateConfig:": "      Colour: blue\n      UpdateConfig:"}, {"MaxUnavailable: 1": "MaxUnavailable: [1]"}])
def test_cfn_lint_refuses_a_broken_copy(tmp_path, edit):
    assert validate.cfn_errors(copied(tmp_path, CFN, CFN.name, edit)) != []


@pytest.mark.parametrize(("path", "value"), [("applications.1.deployments.0.num_replicas", "many"), ("proxy_location", "Everywhere"),
                                             ("applications.1.deployments.0.max_ongoing_request", 4), ("http_options.hots", "0.0.0.0")])
def test_the_serve_checks_refuse_a_broken_config(path, value):
    assert validate.serve_errors(broken(rendered_demo(), path, value)) != []


def test_checkov_refuses_insecure_copies(tmp_path):
    folders = [copied(tmp_path, TF, "main.tf", {'http_tokens                 = "required"': 'http_tokens                 = "optional"'}),
               copied(tmp_path, CFN.parent, CFN.name, {"HttpTokens: required": "HttpTokens: optional"}),
               copied(tmp_path, K8S, "controller-deployment.yaml", {"allowPrivilegeEscalation: false": "allowPrivilegeEscalation: true"})]
    found = validate.run_checkov(*folders)
    assert "checkov" not in found, found.get("checkov")  # checkov itself missing or broken
    assert {k: sorted({f.split()[0] for f in v}) for k, v in found.items()} == {
        "terraform": ["CKV_AWS_79"], "cloudformation": ["CKV_AWS_79"], "kubernetes": ["CKV_K8S_20"]}
