"""Offline checks of the cluster as code in deploy/ (or a copy of it): each file judged by the tool made for it.

Run by tests/test_deploy.py, which adds the checks that need the project's code (the Serve config the controller
renders, the metrics it exports); also runnable alone, before `kubectl apply -k`: `python deploy/validate.py`.

- Kubernetes kinds: kubernetes-validate's bundled strict schemas (Kubernetes 1.33), unknown fields refused.
- RayCluster: KubeRay's CRD schema ($KUBERAY_CRDS, else deploy/kuberay: KubeRay v1.7.0's), closed to unknown fields.
- ServiceMonitor, PodMonitor, PrometheusRule: a closed structure of the fields used; PromQL through promql-parser.
- CloudFormation: cfn-lint. Terraform: python-hcl2 and a reference check; `terraform fmt -check` where terraform is.
- checkov over all three (its own virtual environment: deploy/checkov/install.sh).
- A Serve config: Ray's ServeDeploySchema, and the unknown fields that schema would drop without a word.
Every function returns the errors it finds; none means the input passes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import hcl2
import jsonschema
import kubernetes_validate
import promql_parser
import yaml
from cfnlint import api as cfnlint

__all__ = ["CHECKOV", "CRDS", "K8S_VERSION", "MONITORING", "closed", "cfn_errors", "kustomization_errors", "load_yaml", "manifests",
           "object_errors", "rule_errors", "run_checkov", "serve_errors", "tf_errors", "tf_parse"]

DEPLOY = Path(__file__).resolve().parent
K8S_VERSION = "1.33"
CRDS = Path(os.environ.get("KUBERAY_CRDS") or DEPLOY / "kuberay")
CHECKOV = Path(os.environ.get("CHECKOV") or DEPLOY.parent / ".venv" / "checkov" / "bin" / "checkov")


class CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (!Ref, !Sub, ...) read as plain values."""


CfnLoader.add_multi_constructor("!", lambda loader, _tag, node: loader.construct_scalar(node)
                                if isinstance(node, yaml.ScalarNode) else loader.construct_sequence(node))


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=CfnLoader)


def manifests(folder: Path) -> dict[str, dict[str, Any]]:
    """Every object of a kustomization's folder by kind/name (one object per file)."""
    docs = [load_yaml(p) for p in sorted(folder.glob("*.yaml")) if p.name != "kustomization.yaml"]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def kustomization_errors(folder: Path) -> list[str]:
    """The kustomization lists exactly the files beside it, and kustomize builds it where kubectl is installed."""
    listed = set(yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"])
    files = {p.name for p in folder.iterdir()} - {"kustomization.yaml"}
    errors = [f"{name}: not in kustomization.yaml" for name in sorted(files - listed)]
    errors += [f"{name}: listed in kustomization.yaml, not in {folder}" for name in sorted(listed - files)]
    if shutil.which("kubectl") and not errors:
        done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
        errors += [f"kubectl kustomize: {done.stderr.strip()}"] if done.returncode else []
    return errors


def closed(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever it lists properties and keeps no unknown fields."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not") else v for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: closed(s) for name, s in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            out["additionalProperties"] = False
    return out


@cache
def crd_schema(crds: Path, plural: str) -> dict[str, Any]:
    """The closed v1 schema of a KubeRay CRD (`rayclusters`, `rayservices`)."""
    crd = yaml.safe_load((crds / f"{plural}.crd.yaml").read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return typing.cast(dict[str, Any], closed(v1["schema"]["openAPIV3Schema"]))


def schema_errors(schema: Mapping[str, Any], doc: Any) -> list[str]:
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]


def _obj(properties: dict[str, Any], *required: str) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def _array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": 1}


_STR, _MAP = {"type": "string"}, {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^(\d+(ms|s|m|h|d|w|y))+$"}
_ENDPOINT = _obj({"port": _STR, "path": _STR, "interval": _DURATION, "scrapeTimeout": _DURATION}, "port")
_RULE = _obj({"alert": _STR, "expr": _STR, "for": _DURATION, "labels": _MAP, "annotations": _MAP}, "alert", "expr")
_SPECS = {  # the Prometheus Operator's fields these manifests use (its CRDs are not at hand)
    "ServiceMonitor": _obj({"selector": _obj({"matchLabels": _MAP}), "endpoints": _array(_ENDPOINT)}, "selector", "endpoints"),
    "PodMonitor": _obj({"selector": _obj({"matchLabels": _MAP}), "podMetricsEndpoints": _array(_ENDPOINT)},
                       "selector", "podMetricsEndpoints"),
    "PrometheusRule": _obj({"groups": _array(_obj({"name": _STR, "rules": _array(_RULE)}, "name", "rules"))}, "groups"),
}
MONITORING = {kind: _obj({"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind}, "spec": spec,
                          "metadata": _obj({"name": _STR, "namespace": _STR, "labels": _MAP, "annotations": _MAP}, "name")},
                         "apiVersion", "kind", "metadata", "spec") for kind, spec in _SPECS.items()}


def object_errors(doc: dict[str, Any], crds: Path = CRDS) -> list[str]:
    """One object judged by its kind's validator: KubeRay's CRD, the monitoring structure, or Kubernetes' own schema."""
    if doc["kind"] in ("RayCluster", "RayService"):
        return schema_errors(crd_schema(crds, doc["kind"].lower() + "s"), doc)
    if doc["kind"] in MONITORING:
        errors = schema_errors(MONITORING[doc["kind"]], doc)
        if doc["kind"] == "PrometheusRule" and not errors:
            errors = [e for g in doc["spec"]["groups"] for r in g["rules"] for e in rule_errors(r)]
        return errors
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'.'.join(map(str, err.path))}: {err.message}"]
    return []


def rule_errors(rule: Mapping[str, Any], exported: Mapping[str, set[str]] | None = None) -> list[str]:
    """PromQL that parses (types included); with `exported` (series -> labels), selecting only those series by their labels."""
    try:
        expr = promql_parser.parse(rule["expr"])
        if "for" in rule:
            promql_parser.parse_duration(rule["for"])
    except ValueError as err:
        return [f"{rule['alert']}: {err}"]
    errors: list[str] = []

    def visit(node: Any) -> None:
        if exported is not None and isinstance(node, promql_parser.VectorSelector):
            labels = exported.get(node.name or "")  # a selector by {__name__=...} alone has no name: refused
            if labels is None:
                errors.append(f"{rule['alert']}: nothing exports {node.name}")
            else:
                errors.extend(f"{rule['alert']}: {node.name} has no label {m.name}" for m in node.matchers.matchers
                              if m.name not in labels | {"namespace", "job", "pod", "instance"})

    promql_parser.walk(expr, visit)
    return errors


def cfn_errors(path: Path) -> list[str]:
    return [str(m) for m in cfnlint.lint_file(path, cfnlint.ManualArgs(regions=["us-east-1", "eu-west-1"]))]


def tf_parse(folder: Path) -> dict[str, dict[str, Any]]:
    options = hcl2.SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
    return {p.name: hcl2.loads(p.read_text(), serialization_options=options) for p in sorted(folder.glob("*.tf"))}


def tf_errors(folder: Path) -> list[str]:
    """Syntax (python-hcl2), then references: every var.X and local.X declared, every variable used; terraform fmt if here."""
    try:
        files = tf_parse(folder)
    except Exception as err:  # lark's UnexpectedInput and its kin
        return [f"{folder.name}: {type(err).__name__}: {err}"]
    declared = {name for f in files.values() for block in f.get("variable", []) for name in block}
    local_names = {name for f in files.values() for block in f.get("locals", []) for name in block}
    text = json.dumps([f for name, f in files.items() if name != "variables.tf"])
    used, used_locals = set(re.findall(r"\bvar\.(\w+)", text)), set(re.findall(r"\blocal\.(\w+)", text))
    errors = ([f"var.{v} is not declared in variables.tf" for v in sorted(used - declared)]
              + [f"variable {v} is never used" for v in sorted(declared - used)]
              + [f"local.{v} is not declared" for v in sorted(used_locals - local_names)])
    if shutil.which("terraform"):  # not on every machine; fmt needs no providers (which could not be downloaded anyway)
        done = subprocess.run(["terraform", "fmt", "-check", "-diff", str(folder)], capture_output=True, text=True, timeout=60)
        errors += [f"terraform fmt -check: {done.stdout}"] if done.returncode else []
    return errors


def serve_errors(config: Mapping[str, Any], strict: bool = True) -> list[str]:
    """Ray's ServeDeploySchema; strict: also the unknown fields it would drop without a word."""
    from pydantic import BaseModel, ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        return [str(err)]

    def unknown(model: type[BaseModel], data: Any, where: str) -> list[str]:
        if isinstance(data, list):
            return [e for i, item in enumerate(data) for e in unknown(model, item, f"{where}.{i}")]
        if not isinstance(data, dict):
            return []
        errors = [f"{where}.{key}: not a field of {model.__name__}" for key in data if key not in model.model_fields]
        for name, field in model.model_fields.items():
            nested = [t for t in (field.annotation, *typing.get_args(field.annotation)) for t in (t, *typing.get_args(t))
                      if isinstance(t, type) and issubclass(t, BaseModel)]
            if nested and data.get(name) is not None:
                errors += unknown(nested[0], data[name], f"{where}.{name}")
        return errors

    return unknown(ServeDeploySchema, config, "config") if strict else []


def run_checkov(*folders: Path, checkov: Path = CHECKOV) -> dict[str, list[str]]:
    """One checkov run (terraform, cloudformation, kubernetes) over the folders: the failed checks per framework.
    A report that parsed nothing, passed nothing, or holds a skip without its reason is an error too."""
    if not checkov.exists():
        return {"checkov": [f"no checkov at {checkov}: run `make setup` (it runs deploy/checkov/install.sh) or set CHECKOV"]}
    done = subprocess.run([str(checkov), *(a for f in folders for a in ("-d", str(f))), "--framework", "terraform", "cloudformation",
                           "kubernetes", "-o", "json", "--compact", "--skip-download", "--soft-fail"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    if done.returncode:
        return {"checkov": [done.stderr[-2000:]]}
    reports, text = [], done.stdout.strip()
    while text:  # one JSON document per batch of frameworks
        doc, end = json.JSONDecoder().raw_decode(text)
        reports += doc if isinstance(doc, list) else [doc]
        text = text[end:].strip()
    out = {}
    for r in reports:
        summary, results = r["summary"], r["results"]
        out[r["check_type"]] = ([f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in results["failed_checks"]]
                                + [f"{c['check_id']} {c['resource']}: skipped without a reason" for c in results["skipped_checks"]
                                   if len(c["check_result"].get("suppress_comment", "")) < 20]
                                + ([f"nothing checked: {summary}"] if summary["parsing_errors"] or not summary["passed"] else []))
    return out


def main(deploy: Path | None = None) -> int:
    """Every check of this module over deploy/; prints what fails, exit status 1 if anything does."""
    deploy = deploy or Path(os.path.relpath(DEPLOY))
    k8s, tf, cfn = deploy / "kubernetes", deploy / "terraform" / "gpu-node-pool", deploy / "aws" / "gpu-nodegroup.yaml"
    errors = {str(k8s / "kustomization.yaml"): kustomization_errors(k8s), str(tf): tf_errors(tf), str(cfn): cfn_errors(cfn)}
    errors |= {f"{k8s} {key}": object_errors(doc) for key, doc in manifests(k8s).items()}
    errors |= {f"checkov {k}": v for k, v in run_checkov(tf, cfn.parent, k8s).items()}
    for subject, found in errors.items():
        print(f"{subject}: {'ok' if not found else 'FAILED'}", *(f"  {e}" for e in found), sep="\n")
    return 1 if any(errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
