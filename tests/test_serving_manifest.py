"""manifests/serving: the InferenceService's predictor is a valid pod spec (kubernetes-validate, strict) that
KServe's default Serverless mode accepts (Knative's field rules with its default features), runs `lgff serve` with
arguments the CLI accepts, probes the v1 readiness path of the served model name, reads S3 credentials from the
Secret by name and the object store's endpoint / region from a ConfigMap, and runs restricted (non-root, read-only
root FS, no capabilities)."""
from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from lgff_core.cli import build_parser
from lgff_core.config import ServeConfig
from test_manifests import MANIFESTS, kustomize

SERVING = MANIFESTS / "serving"
ISVC_ONLY = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency", "timeout",
             "canaryTrafficPercent", "batcher", "logger"}
# Knative Serving's field masks with its default features (pkg/apis/serving/fieldmask.go: PodSpecMask,
# PodSecurityContextMask, SecurityContextMask; pkg/apis/config/features.go defaults: podspec-securitycontext and
# secure-pod-defaults disabled, podspec-volumes-emptydir enabled). A field outside them is rejected ("must not set").
KNATIVE_POD_FIELDS = {"serviceAccountName", "containers", "volumes", "imagePullSecrets", "enableServiceLinks",
                      "automountServiceAccountToken"}
KNATIVE_CONTAINER_SECURITY = {"capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup", "runAsNonRoot",
                              "allowPrivilegeEscalation", "seccompProfile", "privileged"}


def _isvc(directory: Path = SERVING / "base") -> dict:
    (doc,) = [o for o in kustomize(directory) if o["kind"] == "InferenceService"]
    return doc


def knative_rejections(predictor: dict) -> list[str]:
    """The fields Knative (default features) refuses in a predictor's pod spec."""
    pod = {k: v for k, v in predictor.items() if k not in ISVC_ONLY}
    bad = [f"pod field {k}" for k in pod if k not in KNATIVE_POD_FIELDS]
    if pod.get("automountServiceAccountToken") is True:
        bad.append("automountServiceAccountToken may only be false")
    for vol in pod.get("volumes", []):
        if set(vol) - {"name", "emptyDir", "configMap", "secret", "projected"}:
            bad.append(f"volume {vol['name']}")
    for c in pod.get("containers", []):
        bad += [f"{c['name']}: securityContext.{k}" for k in c.get("securityContext", {})
                if k not in KNATIVE_CONTAINER_SECURITY]
        if c.get("securityContext", {}).get("privileged"):
            bad.append(f"{c['name']}: privileged")
    return bad


def test_knative_check_catches_a_pod_level_security_context():
    assert knative_rejections({"securityContext": {"runAsUser": 1000, "fsGroup": 1000},
                               "containers": [{"name": "c", "securityContext": {"procMount": "Default"}}]}) == [
        "pod field securityContext", "c: securityContext.procMount"]


@pytest.mark.parametrize("directory", [SERVING / "base", SERVING / "minio-dev"], ids=lambda p: p.name)
def test_predictor_is_a_valid_pod_spec_that_serverless_kserve_accepts(directory):
    isvc = _isvc(directory)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    predictor = isvc["spec"]["predictor"]
    pod_spec = {k: v for k, v in predictor.items() if k not in ISVC_ONLY}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": isvc["metadata"]["name"]}, "spec": pod_spec}
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    assert knative_rejections(predictor) == []


def test_container_runs_lgff_serve_with_probe_creds_and_restrictions():
    pred = _isvc()["spec"]["predictor"]
    (c,) = pred["containers"]
    args = build_parser().parse_args(c["command"][1:] + c["args"])  # the CLI accepts the arguments
    assert args.command == "serve" and args.model.startswith("s3://") and args.index.startswith("s3://")
    assert args.host == "0.0.0.0"  # lgff serve listens on 127.0.0.1 unless told: the pod must take outside traffic
    assert [p["containerPort"] for p in c["ports"]] == [args.port]
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == f"/v1/models/{ServeConfig().model_name}" and probe["port"] == args.port
    env = {e["name"]: e for e in c["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "lgff-s3-credentials", "key": key}
    assert c["resources"]["requests"] and c["resources"]["limits"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsNonRoot"] and sc["runAsUser"] not in (None, 0)
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert "securityContext" not in pred  # Knative refuses it unless kubernetes.podspec-securitycontext is on
    # a read-only root needs a writable /tmp (index download, HOME)
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]) and env["HOME"]["value"] == "/tmp"


@pytest.mark.parametrize("directory", [SERVING / "base", SERVING / "minio-dev"], ids=lambda p: p.name)
def test_object_store_endpoint_and_region_come_from_the_configmap(directory):
    objects = kustomize(directory)
    (config,) = [o for o in objects if o["kind"] == "ConfigMap"]
    (c,) = _isvc(directory)["spec"]["predictor"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    for key in ("AWS_ENDPOINT_URL", "AWS_REGION"):
        assert "value" not in env[key], f"{key} is hard-coded"
        assert env[key]["valueFrom"]["configMapKeyRef"]["name"] == config["metadata"]["name"]
    assert env["AWS_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"].get("optional") is True  # absent for AWS S3
    assert config["data"]["AWS_REGION"]
    if directory.name == "base":
        assert "AWS_ENDPOINT_URL" not in config["data"]
    else:  # the dev MinIO of manifests/overlays/minio-dev, in its namespace
        minio = {(o["metadata"]["name"], o["metadata"]["namespace"]) for o in kustomize(MANIFESTS / "overlays" / "minio-dev")
                 if o["kind"] == "Service"}
        host = config["data"]["AWS_ENDPOINT_URL"].split("://")[1].split(":")[0]
        assert tuple(host.split(".")[:2]) in minio
        assert {o["metadata"]["namespace"] for o in objects} == {ns for _, ns in minio}


def test_no_serving_manifest_names_the_dev_endpoint_outside_its_overlay():
    for path in (SERVING / "base").rglob("*.yaml"):
        assert "lgff-minio" not in "".join(line for line in path.read_text().splitlines(True)
                                          if not line.lstrip().startswith("#")), path
    assert yaml.safe_load((SERVING / "minio-dev" / "kustomization.yaml").read_text())["resources"] == ["../base"]
