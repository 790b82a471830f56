"""The layout is the design: one engine-free halting decision (``core/``) and two engines that
apply it (``hf/``, ``vllm/``); docs/architecture.md names every module where it lives."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "dash_prefill"
# What each part may import of the package (besides itself): loading is the model/cache service.
ALLOWED = {"core": {"loading"}, "hf": {"core", "loading"}, "vllm": {"core", "loading"}}


def _imports(path: Path) -> set[str]:
    """The package's top-level parts (``core``, ``hf``, ``loading``, ...) that ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            if name.startswith("dash_prefill."):
                found.add(name.split(".")[1])
        if isinstance(node, ast.ImportFrom) and node.level:
            found.add("relative")
    return found


def test_the_core_and_each_engine_import_only_what_the_layout_allows():
    for part, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / part).rglob("*.py")):
            assert _imports(path) <= allowed | {part}, (path.relative_to(PACKAGE), sorted(_imports(path) - allowed - {part}))


def test_the_engines_share_one_halting_decision():
    # the vLLM engine selects with the core's functions, not a copy of its own
    model = (PACKAGE / "vllm" / "model.py").read_text()
    assert "select_among_survivors" in model and "Eligibility.of_prompt" in model and "policy_scores" in model
    assert "def select_among_survivors" in (PACKAGE / "core" / "policy.py").read_text()
    assert "def select_among_survivors" not in model + (PACKAGE / "hf" / "prefill.py").read_text()


def test_architecture_md_names_each_module_of_the_core_and_the_engines_in_its_folder():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for part in ALLOWED:
        for path in sorted((PACKAGE / part).glob("*.py")):
            if path.name != "__init__.py":
                assert f"{part}/{path.name}" in doc, f"architecture.md does not name {part}/{path.name}"
