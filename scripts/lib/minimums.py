"""Print "name[extras]==N" for the requirements "name[extras]>=N" of the given extras of
./pyproject.toml, one a line (used by scripts/test-minimums). Run it with the Python to
test: a requirement whose marker does not hold there is left out, and of several
requirements on one name the highest minimum counts. The test environment's
opentelemetry-sdk has to match opentelemetry-api, so it is printed beside it."""

import sys
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

with open("pyproject.toml", "rb") as file:
    declared = tomllib.load(file)["project"]["optional-dependencies"]
pins: dict[str, tuple[str, list[str]]] = {}  # name: (extras, floors)
for extra in sys.argv[1:]:
    if extra not in declared:
        sys.exit(f"scripts/test-minimums: pyproject.toml has no extra {extra!r}")
    for line in declared[extra]:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if not floors:
            sys.exit(f"scripts/test-minimums: {line!r} (extra {extra}) declares no minimum")
        wanted = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        before = pins.get(requirement.name, ("", []))
        pins[requirement.name] = (before[0] or wanted, before[1] + floors)
for name, (wanted, floors) in pins.items():
    floor = max(floors, key=Version)
    print(f"{name}{wanted}=={floor}")
    if name == "opentelemetry-api":
        print(f"opentelemetry-sdk=={floor}")
