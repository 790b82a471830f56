"""docs/architecture.md tells the truth about imports: the core imports only the core and the families."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "dash_prefill"


def _sections() -> dict[str, set[str]]:
    """Module names (``x.py`` or ``x/``) per section of the diagram (core, families, tools, ...)."""
    block = (ROOT / "docs" / "architecture.md").read_text().split("```")[1]
    sections, current = {}, None
    for line in block.splitlines():
        if line[:1].isalpha():
            current = line.split()[0]
        if current:
            sections.setdefault(current, set()).update(re.findall(r"\b([a-z_]+)(?:\.py\b|/)", line))
    return sections


def _imports(path: Path) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in it (top-level modules only)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_the_core_imports_only_modules_the_diagram_puts_in_the_core_or_the_families():
    sections = _sections()
    allowed = sections["core"] | sections["families"]
    for name in sorted(sections["core"]):
        path = PACKAGE / f"{name}.py" if (PACKAGE / f"{name}.py").exists() else PACKAGE / name / "__init__.py"
        assert path.exists(), f"architecture.md names {name}, which does not exist"
        assert _imports(path) <= allowed, (name, sorted(_imports(path) - allowed))
