"""Turn KubeRay's CRDs (the v1 openAPIV3Schema) into strict JSON schemas for offline validation.

Run offline against a local clone of ray-project/kuberay (see README.md here):
    python deploy/kuberay/schemas/convert.py --kuberay ../kuberay --ref v1.7.0

The API server refuses unknown fields (`kubectl apply` validates strictly); plain JSON schema
allows them, so every object that lists its `properties` and says nothing else about extra keys
gets `additionalProperties: false`, and a misspelt field fails here as it would there.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

CRD_DIR = "ray-operator/config/crd/bases"
CRDS = {"rayjob_v1.json": "ray.io_rayjobs.yaml", "raycluster_v1.json": "ray.io_rayclusters.yaml"}
VERSION = "v1"
# Kubernetes extensions with no JSON-schema meaning beyond what convert() does with them: list
# and map merge strategies (server-side apply only) and CEL rules (x-kubernetes-validations),
# which only the API server evaluates. Any other x-kubernetes-* key is refused, not guessed at.
DROPPED = {"x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
           "x-kubernetes-validations"}
HANDLED = {"x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields"}

# The top-level metadata a manifest may set (ObjectMeta's user-set fields): the CRD leaves it as
# a bare `type: object` because the API server checks it itself.
OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 253},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
    "additionalProperties": False,
}


def strict(node: Any, where: str = "#") -> Any:
    """A copy of one structural-schema node as plain JSON schema (draft 2020-12)."""
    if isinstance(node, list):
        return [strict(n, f"{where}/{i}") for i, n in enumerate(node)]
    if not isinstance(node, dict):
        return node
    unknown = {k for k in node if k.startswith("x-kubernetes-")} - DROPPED - HANDLED
    if unknown:
        raise SystemExit(f"convert.py: {where} uses {sorted(unknown)}, which this converter does not handle")
    out: dict[str, Any] = {}
    for key, val in node.items():
        if key in DROPPED or key in HANDLED:
            continue
        if key == "properties":
            out[key] = {name: strict(sub, f"{where}/properties/{name}") for name, sub in val.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(val, dict):
            out[key] = strict(val, f"{where}/{key}")
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = strict(val, f"{where}/{key}")
        elif key == "nullable":
            continue  # folded into `type` below
        else:
            out[key] = copy.deepcopy(val)
    if node.get("x-kubernetes-int-or-string"):
        # Kubernetes accepts an integer or a string here (a Quantity, a port name); `pattern`
        # beside it applies to the string form only, as in JSON schema.
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    open_ended = node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in node
    if "properties" in node and not open_ended:
        out["additionalProperties"] = False
    return out


def convert(crd: dict, version: str = VERSION, source: str = "") -> dict:
    """The JSON schema of one version of a CRD: its openAPIV3Schema made strict, with the
    manifest's own apiVersion, kind and metadata checked too."""
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    found = [v for v in crd["spec"]["versions"] if v["name"] == version]
    if not found:
        raise SystemExit(f"convert.py: {kind} has no version {version}")
    schema = strict(found[0]["schema"]["openAPIV3Schema"])
    schema["properties"].update({
        "apiVersion": {"const": f"{group}/{version}"},
        "kind": {"const": kind},
        "metadata": OBJECT_META,
    })
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    schema["additionalProperties"] = False
    head = {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": f"{kind} {group}/{version}, made by deploy/kuberay/schemas/convert.py from {source}",
            "title": f"{kind} ({group}/{version})"}
    return {**head, **schema}


def _git(git_dir: Path, *args: str) -> str:
    proc = subprocess.run(["git", "--git-dir", str(git_dir), *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"convert.py: git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kuberay", type=Path, required=True,
                   help="a clone of ray-project/kuberay (work tree or bare git dir)")
    p.add_argument("--ref", required=True, help="the release tag to read the CRDs from, e.g. v1.7.0")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = p.parse_args(argv)
    git_dir = args.kuberay / ".git" if (args.kuberay / ".git").exists() else args.kuberay
    commit = _git(git_dir, "rev-parse", f"{args.ref}^{{commit}}").strip()
    for out_name, crd_name in CRDS.items():
        text = _git(git_dir, "show", f"{commit}:{CRD_DIR}/{crd_name}")
        digest = hashlib.sha256(text.encode()).hexdigest()
        source = f"ray-project/kuberay {args.ref} ({commit}) {CRD_DIR}/{crd_name} (sha256 {digest})"
        schema = convert(yaml.safe_load(text), VERSION, source)
        path = args.out / out_name
        # Minified: the schemas are read by programs; one line keeps them small and diff-free
        # between identical conversions.
        path.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
        print(f"{path}: {path.stat().st_size:,} bytes from {crd_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
