#!/usr/bin/env bash
# Build the sdist and wheel, check their metadata, install the wheel into a fresh virtualenv and
# smoke-test it from a directory outside the source tree.
#
# Usage: bash .ci/wheel_smoke.sh          (PYTHON=/path/to/python to pick the interpreter)
#
# Speed: torch (GBs) is not reinstalled. The fresh venv is created without system site-packages
# and the wheel goes in with --no-deps --no-index; only afterwards a .pth file appends the build
# venv's site-packages to the fresh venv's sys.path. Directories added by a .pth are put on
# sys.path without their own .pth files being run, so the build venv's editable install of
# clipood_plugin stays inert, and the fresh venv's own site-packages comes first: the import
# below must (and is checked to) resolve to the installed wheel. Adding the .pth only after pip ran
# keeps pip from seeing (and trying to replace) the editable install.
#
# The build runs with --no-isolation (the venv's setuptools, offline, fast) on a copy of the
# files git tracks or would track, so local build junk cannot leak in and the tree stays clean.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3)"
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/clipood-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== wheel smoke: source copy"
"$PY" - "$ROOT" "$WORK/src" <<'PYCODE'
import os, shutil, subprocess, sys
root, dest = sys.argv[1], sys.argv[2]
try:
    out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout.decode()
    paths = [p for p in out.split("\0") if p and os.path.isfile(os.path.join(root, p))]
except (OSError, subprocess.CalledProcessError):  # not a git checkout: take the tree as is
    paths = None
if paths is None:
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info"))
else:
    for rel in paths:
        os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
        shutil.copy2(os.path.join(root, rel), os.path.join(dest, rel))
print(f"copied {len(paths) if paths is not None else 'all'} files")
PYCODE

echo "== wheel smoke: build sdist, then wheel from the sdist"
"$PY" -m build --no-isolation --outdir "$WORK/dist" "$WORK/src" > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
ls -l "$WORK/dist"

echo "== wheel smoke: twine check"
"$PY" -m twine check --strict "$WORK"/dist/*

echo "== wheel smoke: archive contents"
"$PY" - "$WORK/dist" "$WORK/src" <<'PYCODE'
import pathlib, sys, tarfile, zipfile
dist = pathlib.Path(sys.argv[1])
wheel = next(dist.glob("*.whl"))
names = zipfile.ZipFile(wheel).namelist()
top = {n.split("/")[0] for n in names}
stray = {t for t in top if t != "clipood_plugin" and not t.endswith(".dist-info")}
assert not stray, f"wheel ships top-level entries besides clipood_plugin: {sorted(stray)}"
assert "clipood_plugin/py.typed" in names, "wheel lacks clipood_plugin/py.typed"
sdist = next(dist.glob("*.tar.gz"))
members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
for need in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "clipood_plugin/py.typed",
             "clipood_plugin/__init__.py"):
    assert need in members, f"sdist lacks {need}"
# one source of truth for the version: clipood_plugin.__version__, read by setuptools (pyproject's
# version is dynamic); the sdist's and the wheel's metadata must both carry it
import ast, email.parser
root = pathlib.Path(sys.argv[2])
init = ast.parse((root / "clipood_plugin" / "__init__.py").read_text(encoding="utf-8"))
source_version = next(node.value.value for node in init.body if isinstance(node, ast.Assign)
                      and any(getattr(t, "id", None) == "__version__" for t in node.targets))
with tarfile.open(sdist) as tar:
    pkg_info = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
    sdist_version = email.parser.Parser().parsestr(tar.extractfile(pkg_info).read().decode())["Version"]
with zipfile.ZipFile(wheel) as whl:
    meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
    wheel_version = email.parser.Parser().parsestr(whl.read(meta).decode())["Version"]
assert sdist_version == wheel_version == source_version, (sdist_version, wheel_version, source_version)
try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # 3.10: the metadata checks above already hold the versions equal
    tomllib = None
project = {"dynamic": ["version"]} if tomllib is None else tomllib.loads(
    (root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
assert "version" not in project and "version" in project.get("dynamic", []), \
    "pyproject.toml types a version of its own: keep clipood_plugin.__version__ the only one"
print(f"{wheel.name}: {len(names)} files; {sdist.name}: {len(members)} members; version {source_version}")
PYCODE

echo "== wheel smoke: install into a fresh venv"
"$PY" -m venv --without-pip "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$PY" -m pip --python "$VPY" install --quiet --no-deps --no-index --no-cache-dir "$WORK"/dist/*.whl
NEW_SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
OLD_SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$OLD_SITE" > "$NEW_SITE/_clipood_ci_deps.pth"

echo "== wheel smoke: import and run from outside the source tree"
mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"
"$VPY" - "$NEW_SITE" <<'PYCODE'
import importlib.metadata as md
import pathlib
import sys

site = pathlib.Path(sys.argv[1]).resolve()
import clipood_plugin

where = pathlib.Path(clipood_plugin.__file__).resolve()
assert where.is_relative_to(site), f"imported clipood_plugin from {where}, not from the installed wheel in {site}"
dist = md.distribution("clipood-plugin")
assert pathlib.Path(str(dist.locate_file(""))).resolve() == site, "metadata does not come from the wheel"
files = {str(f) for f in dist.files or []}
assert "clipood_plugin/py.typed" in files, "py.typed is not among the installed files"
assert (site / "clipood_plugin" / "py.typed").is_file()
assert dist.version == clipood_plugin.__version__, (dist.version, clipood_plugin.__version__)

from packaging.requirements import Requirement

for line in dist.requires or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an optional extra
    have = md.version(req.name)
    assert req.specifier.contains(have, prereleases=True), f"{req} declared, {have} installed"

import clipood_plugin.integrations  # noqa: F401  (lazy: must not pull in the frameworks)

heavy = sorted(m for m in ("lightning", "transformers", "pytorch_lightning") if m in sys.modules)
assert not heavy, f"import clipood_plugin(.integrations) imported {heavy}"

import torch
from torch import nn

from clipood_plugin import BetaMovingAverage, MMSLoss, TextHead, beta_weights

torch.manual_seed(0)
tower = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
head = TextHead(torch.nn.functional.normalize(torch.randn(3, 4), dim=-1), scale=100.0)
loss_fn = MMSLoss(head)
steps = 5
bma = BetaMovingAverage(tower, total_steps=steps)
snaps = [[p.detach().double().clone() for p in tower.parameters()]]
opt = torch.optim.SGD(tower.parameters(), lr=0.1)
for _ in range(steps):
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    loss = loss_fn(tower(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    bma.update_parameters(tower)
    snaps.append([p.detach().double().clone() for p in tower.parameters()])
alpha = beta_weights(steps)
for i, p in enumerate(bma.module.parameters()):
    ref = sum(a * s[i] for a, s in zip(alpha.tolist(), snaps)) / alpha.sum()
    assert torch.allclose(p.double(), ref, rtol=1e-5, atol=1e-6)
assert torch.isfinite(loss)
print(f"wheel smoke: ok (clipood-plugin {dist.version} from {where.parent}, loss {loss.item():.4f})")
PYCODE
