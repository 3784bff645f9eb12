"""manifests/serving: the InferenceService's predictor is a valid pod spec (kubernetes-validate, strict), runs
`lgff serve` with arguments the CLI accepts, probes the v1 readiness path of the served model name, reads S3
credentials from the Secret by name, and runs restricted (non-root, read-only root FS, no capabilities)."""
from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import yaml

from lgff_core.cli import build_parser
from lgff_core.config import ServeConfig

MANIFEST = Path(__file__).resolve().parent.parent / "manifests" / "serving" / "inferenceservice.yaml"
ISVC_ONLY = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency", "timeout",
             "canaryTrafficPercent", "batcher", "logger"}


def _isvc():
    (doc,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return doc


def test_predictor_is_a_valid_pod_spec():
    isvc = _isvc()
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    pod_spec = {k: v for k, v in isvc["spec"]["predictor"].items() if k not in ISVC_ONLY}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": isvc["metadata"]["name"]}, "spec": pod_spec}
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


def test_container_runs_lgff_serve_with_probe_creds_and_restrictions():
    pred = _isvc()["spec"]["predictor"]
    (c,) = pred["containers"]
    args = build_parser().parse_args(c["command"][1:] + c["args"])  # the CLI accepts the arguments
    assert args.command == "serve" and args.model.startswith("s3://") and args.index.startswith("s3://")
    assert [p["containerPort"] for p in c["ports"]] == [args.port]
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == f"/v1/models/{ServeConfig().model_name}" and probe["port"] == args.port
    env = {e["name"]: e for e in c["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "lgff-s3-credentials", "key": key}
    assert c["resources"]["requests"] and c["resources"]["limits"]
    sc, psc = c["securityContext"], pred["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsNonRoot"] and psc["runAsUser"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    # a read-only root needs a writable /tmp (index download, HOME)
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]) and env["HOME"]["value"] == "/tmp"
