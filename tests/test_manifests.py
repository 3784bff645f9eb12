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
                  "CustomResourceDefinition", "PersistentVolume"}
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
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validator_rejects_a_broken_object():
    """The schema check can fail: an unknown field in a Deployment spec is rejected in strict mode."""
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"selector": {"matchLabels": {"a": "b"}}, "replicaz": 1,
                    "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", ["minio-dev", "aws-s3"])
def test_overlays_render_and_validate(overlay):
    objects = render(MANIFESTS / "overlays" / overlay)
    for o in objects:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(by_kind) == len(objects), "duplicate objects after rendering"
    ns = yaml.safe_load((MANIFESTS / "overlays" / overlay / "kustomization.yaml").read_text())["namespace"]
    assert ("Namespace", ns) in by_kind
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
    """No docker engine here: check the Dockerfile's promises statically."""
    repo = MANIFESTS.parent
    text = (repo / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "image must end as a non-root user"
    assert "ARG VARIANT=cpu" in text and "cu124" in text  # CPU default, CUDA via --build-arg VARIANT=cuda
    for ln in lines:
        if ln.startswith("COPY "):
            for src in ln.split()[1:-1]:
                assert (repo / src).exists(), f"Dockerfile copies missing {src}"
    assert "--no-deps ${SAMPLE_PKGS}" in text
    assert not any(w in text for w in (".safetensors", ".pth", "hf_hub", "huggingface")), "no weights baked in"
    ignored = set((repo / ".dockerignore").read_text().split())
    assert {".venv", "runs", "*.safetensors", ".git", "tests"} <= ignored
