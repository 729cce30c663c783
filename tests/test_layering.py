"""The package's folders are the pipeline's stages, and imports only flow downwards.

Every ``import``/``from`` statement of every module (lazy ones inside functions included) is read with ``ast``;
an import of a higher stage, or of a sibling's private name, fails here with the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "refusal_lens"

# stage -> the stages it may import (besides itself). Lower stages never import higher ones.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "organism": {"core"},
    "direction": {"core"},
    "evaluation": {"core", "direction"},
    "sae": {"core", "organism"},
    "lens": {"core", "direction", "evaluation", "sae"},
    "report": {"core", "lens"},
    # abliteration chains direction variants and weighted edits (direction) with generation checks (evaluation)
    # and writes exports; it sits beside lens, below pipelines and cli.
    "abliteration": {"core", "direction", "evaluation"},
    "pipelines": {"core", "organism", "direction", "evaluation", "sae", "lens", "report", "abliteration"},
    "cli": {"core", "organism", "direction", "evaluation", "sae", "lens", "report", "pipelines", "abliteration"},
}
# Root modules outside the stages: the lazy public API (``__init__``) and the test helpers (``testing``).
ROOT_MODULES = {"__init__", "testing"}


def _module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path) -> list[tuple[int, list[str], list[str]]]:
    """(line, imported module as parts under refusal_lens, imported names) for each intra-package import."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "refusal_lens":
                target = node.module.split(".")[1:]
            else:
                continue
            out.append((node.lineno, target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "refusal_lens":
                    out.append((node.lineno, alias.name.split(".")[1:], []))
    return out


def _files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "checkpoint" not in p.parts)


def test_every_module_belongs_to_a_stage():
    loose = [str(p.relative_to(PACKAGE)) for p in _files() if len(_module_name(p)) <= 1 and p.stem not in ROOT_MODULES]
    stages = {p.relative_to(PACKAGE).parts[0] for p in _files() if len(p.relative_to(PACKAGE).parts) > 1}
    assert not loose, f"modules outside a stage folder: {loose}"
    assert stages == set(ALLOWED), f"stage folders {sorted(stages)} differ from the declared {sorted(ALLOWED)}"


@pytest.mark.parametrize("path", [p for p in _files() if p.relative_to(PACKAGE).parts[0] in ALLOWED], ids=str)
def test_imports_flow_downwards(path):
    stage = path.relative_to(PACKAGE).parts[0]
    bad = []
    for line, target, names in _imports(path):
        if not target:  # ``from .. import __version__``: the root package's metadata
            assert set(names) <= {"__version__"}, f"{path.name}:{line} imports {names} from the root package"
            continue
        other = target[0]
        if other != stage and other not in ALLOWED[stage]:
            bad.append(
                f"{path.relative_to(PACKAGE)}:{line} imports refusal_lens.{'.'.join(target)} ({stage} → {other})"
            )
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        if private:
            bad.append(f"{path.relative_to(PACKAGE)}:{line} imports private {private} from {'.'.join(target)}")
    assert not bad, "\n".join(bad)


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in _files() if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"split these modules: {long}"
