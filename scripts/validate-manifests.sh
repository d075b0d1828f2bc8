#!/usr/bin/env bash
# Validates the Kubernetes manifests (images/deploy/*.yaml, or the files given) offline:
#  - every object against the Kubernetes API's JSON schemas, strictly (an unknown or
#    misspelt field fails, and so does a kind or apiVersion with no schema), for the
#    oldest and the newest Kubernetes release we target;
#  - every ConfigMap key ending in .toml parses as TOML;
#  - every container image is pinned by digest (name@sha256:<64 hex>).
# The validator, kubernetes-validate from PyPI, ships the schemas inside the package:
# nothing is fetched while validating. It is installed once, pinned, into a venv under
# ${CLEAVE_CACHE:-$HOME/.cache/cleave}/venv-k8s (needs Debian's python3-venv:
# `make deps`); re-running reuses it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${CLEAVE_CACHE:-$HOME/.cache/cleave}
venv=$cache/venv-k8s

# kubernetes-validate 1.37.0 ships schemas for Kubernetes 1.25 to 1.37. The manifests
# target 1.30 and later (securityContext.appArmorProfile is GA from 1.30).
K8S_VERSIONS=(1.30.0 1.37.0)
PIP_PKGS=(
  kubernetes-validate==1.37.0
  # its dependencies, pinned so that the validator does not change under us
  attrs==26.1.0 importlib_resources==7.1.0 jsonschema==4.26.0
  jsonschema-specifications==2025.9.1 packaging==26.4 PyYAML==6.0.4
  referencing==0.37.0 rpds-py==2026.9.1 typing_extensions==4.16.0
)

log() { echo "validate-manifests: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The stamp names exactly what is installed: a change to PIP_PKGS reinstalls.
want=$(printf '%s\n' "${PIP_PKGS[@]}" | sha256sum | cut -c1-16)
stamp=$venv/.cleave-installed-$want
if [ ! -e "$stamp" ] || [ ! -x "$venv/bin/python" ]; then
  log "installing kubernetes-validate into $venv"
  rm -rf "$venv"
  mkdir -p "$cache"
  /usr/bin/python3 -m venv "$venv" || die "cannot create a venv: is python3-venv installed? (make deps)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input "${PIP_PKGS[@]}"
  touch "$stamp"
fi

if [ $# -gt 0 ]; then
  files=("$@")
else
  shopt -s nullglob
  files=("$repo"/images/deploy/*.yaml)
  [ ${#files[@]} -gt 0 ] || die "no manifests in $repo/images/deploy"
fi

"$venv/bin/python" - "${K8S_VERSIONS[*]}" "${files[@]}" <<'PY' || die "invalid manifests (above)"
import re, sys, tomllib, yaml
from kubernetes_validate import utils as kv

versions, paths = sys.argv[1].split(), sys.argv[2:]
DIGEST = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")
bad = []
for path in paths:
    try:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
    except (OSError, yaml.YAMLError) as e:
        bad.append(f"{path}: {e}")
        continue
    if not docs:
        bad.append(f"{path}: no Kubernetes objects")
    for doc in docs:
        if not isinstance(doc, dict):
            bad.append(f"{path}: a document is not a mapping")
            continue
        name = f"{path}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        for v in versions:
            try:
                kv.validate(doc, v, strict=True)
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.path) or "(top level)"
                bad.append(f"{name}: Kubernetes {e.version}: {where}: {e.message}")
            except (kv.SchemaNotFoundError, kv.InvalidSchemaError, kv.VersionNotSupportedError) as e:
                # An unknown kind or apiVersion is an error here, not a warning.
                bad.append(f"{name}: {e.message}")
            except KeyError as e:
                bad.append(f"{name}: no {e} field")
        if doc.get("kind") == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                if key.endswith(".toml"):
                    try:
                        tomllib.loads(text)
                    except tomllib.TOMLDecodeError as e:
                        bad.append(f"{name}: {key} is not valid TOML: {e}")
        spec = doc.get("spec") or {}
        pod = ((spec.get("template") or {}).get("spec") or {}) if "template" in spec else spec
        for group in ("initContainers", "containers", "ephemeralContainers"):
            for c in pod.get(group) or []:
                if not DIGEST.match(str(c.get("image", ""))):
                    bad.append(f"{name}: container {c.get('name')}: image {c.get('image')!r} "
                               "is not pinned by digest (name@sha256:<64 hex>)")
for b in bad:
    print(f"validate-manifests: {b}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
log "${#files[@]} file(s) valid against Kubernetes ${K8S_VERSIONS[*]} (strict)"
