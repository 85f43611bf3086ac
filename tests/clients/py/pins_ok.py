"""Exits 0 when every `name==version` pin in requirements.txt is installed at that version in
this interpreter's environment, 1 (naming the first difference) otherwise: .ci/run and
tests/clients.rs reinstall the venv then, so a stale venv never runs the checks."""

import importlib.metadata
import pathlib
import sys

requirements = pathlib.Path(__file__).with_name("requirements.txt")
for line in requirements.read_text().splitlines():
    pin = line.split("#", 1)[0].split("\\", 1)[0].strip()
    if not pin or pin.startswith("--"):
        continue
    name, _, wanted = pin.partition("==")
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != wanted:
        print(f"{name}: {installed or 'not installed'}, pinned {wanted}", file=sys.stderr)
        sys.exit(1)
