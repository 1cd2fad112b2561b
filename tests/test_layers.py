"""The package is layered: each folder of `ldm/` imports only the folders below it (docs/architecture.md).

An upward import is what made the old import cycle possible (the LightningModule -> first-stage loader ->
CompVis import -> LightningModule), so the rule is checked on the source, together with its corollary: no
`ldm` import hides inside a function (a function-level import is how a cycle is papered over)."""
import ast
import os
from pathlib import Path

import pytest

LAYERS = ("utils", "nets", "data", "metrics", "diffusion", "models", "loading", "inference", "evaluation",
          "training", "cli")
PACKAGE = Path(__file__).resolve().parents[1] / "ldm"


def layer_of(module: str) -> int | None:
    """The layer index of a dotted module name (`ldm.models.autoencoder` -> models); None for `ldm` itself."""
    parts = module.split(".")
    if parts[0] != "ldm" or len(parts) < 2 or parts[1] == "configs":  # configs: YAML, no code
        return None
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module}: every module of ldm/ lives in one of the layers {LAYERS}")
    return LAYERS.index(parts[1])


def ldm_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, at module level?) of every absolute `ldm` import in a file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / `try:` blocks at module level count as module level
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(child) for child in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found += [(node.lineno, name, id(node) in top_level) for name in names if name.split(".")[0] == "ldm"]
    return found


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layering_violations(root: Path) -> list[str]:
    """Every import of a higher layer, and every function-level `ldm` import, under the package `root`."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        own = layer_of(module)
        for line, imported, at_module_level in ldm_imports(path):
            where = f"{path.relative_to(root.parent)}:{line}"
            if not at_module_level:
                problems.append(f"{where} imports {imported} inside a function (import it at the top)")
            target = layer_of(imported)
            if own is not None and target is not None and target > own:
                problems.append(f"{where}: {LAYERS[own]} imports {imported} ({LAYERS[target]} is above it)")
    return problems


def test_no_module_imports_a_layer_above_it():
    assert layering_violations(PACKAGE) == []


def test_every_module_lives_in_a_layer():
    stray = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert stray == [], f"modules outside the layer folders: {stray}"


@pytest.mark.parametrize("planted, expected", [
    ("from ldm.training.pipeline import train\n", "nets imports ldm.training.pipeline"),
    ("def f():\n    from ldm.utils.files import load_checkpoint\n", "inside a function"),
])
def test_a_planted_violation_is_reported(tmp_path, planted, expected):
    package = tmp_path / "ldm"
    for layer in ("nets", "training", "utils"):
        (package / layer).mkdir(parents=True)
        (package / layer / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "nets" / "unet.py").write_text("from ldm.utils.files import load_checkpoint\n" + planted)
    problems = layering_violations(package)
    assert len(problems) == 1 and expected in problems[0], problems


def test_largest_module_stays_readable():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda item: -item[1])[:3]


if __name__ == "__main__":
    print("\n".join(layering_violations(PACKAGE)) or "no violations")
    os.sys.exit(0)
