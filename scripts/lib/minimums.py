"""Print "name[extras]==N" for each requirement "name[extras]>=N" of the given extras of
./pyproject.toml, one a line (used by scripts/test-minimums). The test environment's
opentelemetry-sdk has to match opentelemetry-api, so it is printed beside it."""

import sys
import tomllib

from packaging.requirements import Requirement

with open("pyproject.toml", "rb") as file:
    declared = tomllib.load(file)["project"]["optional-dependencies"]
for extra in sys.argv[1:]:
    if extra not in declared:
        sys.exit(f"scripts/test-minimums: pyproject.toml has no extra {extra!r}")
    for line in declared[extra]:
        requirement = Requirement(line)
        floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if not floors:
            sys.exit(f"scripts/test-minimums: {line!r} (extra {extra}) declares no minimum")
        wanted = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        print(f"{requirement.name}{wanted}=={floors[0]}")
        if requirement.name == "opentelemetry-api":
            print(f"opentelemetry-sdk=={floors[0]}")
