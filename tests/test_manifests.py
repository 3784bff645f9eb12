"""manifests/: every file validates against a recent Kubernetes schema (kubernetes-validate, strict), and the
kustomize overlays render with the expected namespace, patches and Secret references.

There is no kustomize binary here (and no maintained pure-Python kustomize on PyPI), so `render` below implements
exactly the subset the manifests use: ``resources`` (files and kustomization directories), ``patches`` (strategic
merge of mappings, matched by kind + name) and ``namespace`` (namespaced kinds, plus the Namespace object's own
name), applied in kustomize's order (resources -> patches -> namespace). A kustomization using anything else fails
the test instead of being rendered wrongly.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
K8S_VERSION = kubernetes_validate.latest_version()
CLUSTER_SCOPED = {"Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding", "StorageClass",
                  "CustomResourceDefinition", "PersistentVolume", "Profile"}
# custom resources: kubernetes-validate has no schema for them; checked field by field in their own tests
CUSTOM_KINDS = {("kubeflow.org/v1", "Profile")}
OVERLAYS = ["minio-dev", "aws-s3", "kubeflow-profile"]
SUPPORTED_KEYS = {"apiVersion", "kind", "namespace", "resources", "patches"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(patch)


def render(directory: Path) -> list[dict]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kust) - SUPPORTED_KEYS
    assert not unsupported, f"{directory}: renderer does not support {unsupported}"
    objects: list[dict] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        objects += render(path) if path.is_dir() else _docs(path)
    for patch_ref in kust.get("patches", []):
        assert set(patch_ref) == {"path"}, f"{directory}: only file patches are supported, got {patch_ref}"
        for patch in _docs(directory / patch_ref["path"]):
            hits = [i for i, o in enumerate(objects)
                    if o["kind"] == patch["kind"] and o["metadata"]["name"] == patch["metadata"]["name"]]
            assert len(hits) == 1, f"{directory}: patch {patch_ref['path']} matches {len(hits)} objects"
            objects[hits[0]] = _merge(objects[hits[0]], patch)
    ns = kust.get("namespace")
    if ns:
        for o in objects:
            if o["kind"] == "Namespace":
                o["metadata"]["name"] = ns
            elif o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = ns
    return objects


def _all_manifest_files() -> list[Path]:
    # serving/ holds KServe custom resources (no schema here): tests/test_serving_manifest.py validates them
    return sorted(p for p in MANIFESTS.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and p.relative_to(MANIFESTS).parts[0] != "serving")


@pytest.mark.parametrize("path", _all_manifest_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_manifest_validates_against_kubernetes_schema(path):
    docs = _docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        # patches are partial objects: validate them merged into their target (test_overlays_render), not alone
        if "patch" in path.name:
            assert {"apiVersion", "kind", "metadata"} <= set(doc)
            continue
        _validate(doc)


def _validate(doc: dict) -> None:
    if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}, doc
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validator_rejects_a_broken_object():
    """The schema check can fail: an unknown field in a Deployment spec is rejected in strict mode."""
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"selector": {"matchLabels": {"a": "b"}}, "replicaz": 1,
                    "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render_and_validate(overlay):
    objects = render(MANIFESTS / "overlays" / overlay)
    for o in objects:
        _validate(o)
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(by_kind) == len(objects), "duplicate objects after rendering"
    ns = yaml.safe_load((MANIFESTS / "overlays" / overlay / "kustomization.yaml").read_text())["namespace"]
    # single-user overlays create the namespace; multi-user Kubeflow's Profile creates it (never both)
    assert (("Namespace", ns) in by_kind) != (("Profile", ns) in by_kind)
    for o in objects:
        if o["kind"] not in CLUSTER_SCOPED:
            assert o["metadata"]["namespace"] == ns, o["metadata"]
    launcher = by_kind[("ConfigMap", "kfp-launcher")]
    assert launcher["data"]["defaultPipelineRoot"].startswith("s3://")
    providers = yaml.safe_load(launcher["data"]["providers"])
    ref = providers["s3"]["default"]["credentials"]["secretRef"]
    assert ref == {"secretName": "lgff-s3-credentials", "accessKeyKey": "AWS_ACCESS_KEY_ID",
                   "secretKeyKey": "AWS_SECRET_ACCESS_KEY"}
    # no Secret is ever rendered from git: credentials are created out of band
    assert not [o for o in objects if o["kind"] == "Secret"]
    assert ("PriorityClass", "lgff-gpu-batch") in by_kind


def test_minio_overlay_patches_applied():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render(MANIFESTS / "overlays" / "minio-dev")}
    launcher = yaml.safe_load(objects[("ConfigMap", "kfp-launcher")]["data"]["providers"])
    assert "lgff-minio" in launcher["s3"]["default"]["endpoint"]
    assert objects[("ResourceQuota", "lgff-gpu-quota")]["spec"]["hard"]["requests.nvidia.com/gpu"] == "1"
    assert objects[("Namespace", "lgff-dev")]["metadata"]["labels"]["lgff/environment"] == "dev"
    # MinIO and the bucket job read credentials from the same Secret, by name
    text = json.dumps([objects[("Deployment", "lgff-minio")], objects[("Job", "lgff-minio-make-bucket")]])
    assert text.count('"name": "lgff-s3-credentials"') == 4


def test_renderer_namespace_and_patch_semantics(tmp_path):
    """The tiny renderer itself: patch merges nested mappings, namespace skips cluster-scoped kinds."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "kustomization.yaml").write_text("resources: [cm.yaml, pc.yaml]\n")
    (tmp_path / "base" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: '1', b: '2'}\n")
    (tmp_path / "base" / "pc.yaml").write_text(
        "apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: p}\nvalue: 1\n")
    (tmp_path / "kustomization.yaml").write_text("namespace: x\nresources: [base]\npatches: [{path: p.yaml}]\n")
    (tmp_path / "p.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {b: '3'}\n")
    cm, pc = render(tmp_path)
    assert cm["data"] == {"a": "1", "b": "3"} and cm["metadata"]["namespace"] == "x"
    assert "namespace" not in pc["metadata"]


def test_secret_template_has_placeholders_only():
    (secret,) = _docs(MANIFESTS / "secrets" / "s3-credentials.template.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "lgff-s3-credentials"
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(v.startswith("<") and v.endswith(">") for v in secret["stringData"].values())


def test_dockerfile_static_checks():
    """The Dockerfile's promises that hold for every build (`make cluster-check` builds and runs the image)."""
    import re

    repo = MANIFESTS.parent
    text = (repo / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", text, flags=re.M))
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "image must end as a non-root user"
    assert args["VARIANT"] == "cpu" and "cu124" in text  # CPU default, CUDA via --build-arg VARIANT=cuda
    assert args["BASE_IMAGE"].startswith("python:3.11-slim")  # users get the official image by default
    for ln in lines:
        if ln.startswith("COPY ") and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                src = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], src)
                assert (repo / src).exists(), f"Dockerfile copies missing {src}"
    assert "--no-deps ${SAMPLE_PKGS}" in text and "--no-index" in text
    # run time: weights from the image's dir, no hub, every writable path under /tmp (read-only root FS)
    assert "LGFF_WEIGHTS_DIR=/opt/lgff/weights" in text and "HF_HUB_OFFLINE=1" in text
    for var in ("HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TORCH_HOME", "HF_HOME"):
        assert re.search(rf"\b{var}=/tmp\b", text), var
    assert not [ln for ln in lines if ln.startswith("ENTRYPOINT")], "KFP sets each task's command; an ENTRYPOINT would prefix it"
    ignored = (repo / ".dockerignore").read_text().split()
    assert {".venv", "runs", "*.safetensors", ".git", "tests"} <= set(ignored)
    assert "!weights/*.safetensors" in ignored


# ------------------------------------------------------------------------- launcher identity, multi-user, PodSecurity
def _pod_templates(objects: list[dict]) -> dict[str, dict]:
    out = {}
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out[f"{o['kind']}/{o['metadata']['name']}"] = o["spec"]["template"]["spec"]
        elif o["kind"] == "CronJob":
            out[f"CronJob/{o['metadata']['name']}"] = o["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return out


RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """Pod Security Standard "restricted" (Kubernetes docs, policy v1.30) plus this project's read-only root FS rule:
    every failed check as a short message (empty = admitted)."""
    bad = []
    pod_sc = pod.get("securityContext", {})
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            bad.append(f"{host} set")
    for vol in pod.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            bad.append(f"volume {vol['name']}: type {kinds - RESTRICTED_VOLUME_TYPES} not allowed")
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{name}: capabilities.drop must contain ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: adds capabilities {caps['add']}")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            bad.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            bad.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost, got {seccomp}")
        if not sc.get("readOnlyRootFilesystem"):
            bad.append(f"{name}: readOnlyRootFilesystem must be true")
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        home = next((e["value"] for e in c.get("env", []) if e["name"] == "HOME"), None)
        if home is not None and not any(home == m or home.startswith(m.rstrip("/") + "/") for m in mounts):
            bad.append(f"{name}: HOME={home} is not on a mounted (writable) volume")
    return bad


def test_restricted_check_catches_each_violation():
    pod = {"containers": [{"name": "c", "image": "i"}], "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    text = "\n".join(restricted_violations(pod))
    for expected in ("allowPrivilegeEscalation", "drop must contain ALL", "runAsNonRoot", "seccompProfile",
                     "readOnlyRootFilesystem", "hostPath"):
        assert expected in text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_passes_pod_security_restricted(overlay):
    pods = _pod_templates(render(MANIFESTS / "overlays" / overlay))
    if overlay == "minio-dev":
        assert set(pods) == {"Deployment/lgff-minio", "Job/lgff-minio-make-bucket"}
    problems = {name: restricted_violations(pod) for name, pod in pods.items()}
    assert not any(problems.values()), problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_launcher_service_account_has_its_token_and_rights(overlay):
    objects = render(MANIFESTS / "overlays" / overlay)
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    sa = by_kind[("ServiceAccount", "lgff-pipeline-runner")]
    # the KFP v2 launcher calls the API with the pod's token: it must be mounted
    assert sa.get("automountServiceAccountToken", True) is True
    launcher = by_kind[("ConfigMap", "kfp-launcher")]
    secret = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]["credentials"]["secretRef"]["secretName"]
    binding = by_kind[("RoleBinding", "lgff-pipeline-runner")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lgff-pipeline-runner"}]
    role = by_kind[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]

    def allowed(group, resource, verb, name=None):
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                   and (name is None or name in r.get("resourceNames", [name])) for r in role["rules"])

    assert allowed("", "configmaps", "get", "kfp-launcher")
    assert allowed("", "secrets", "get", secret)
    assert allowed("argoproj.io", "workflowtaskresults", "create")
    assert not allowed("", "secrets", "get", "some-other-secret"), "secrets readable beyond the S3 one"
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in role["rules"])


def test_multi_user_overlay_is_a_kubeflow_profile():
    objects = render(MANIFESTS / "overlays" / "kubeflow-profile")
    (profile,) = [o for o in objects if o["kind"] == "Profile"]
    assert profile["apiVersion"] == "kubeflow.org/v1"
    assert profile["spec"]["owner"]["kind"] in ("User", "Group") and profile["spec"]["owner"]["name"]
    ns = yaml.safe_load((MANIFESTS / "overlays" / "kubeflow-profile" / "kustomization.yaml").read_text())["namespace"]
    assert profile["metadata"]["name"] == ns and "namespace" not in profile["metadata"]
    assert not [o for o in objects if o["kind"] == "Namespace"], "the Profile creates the namespace"
