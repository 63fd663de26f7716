"""The README's tour names every module of the four packages, and names no module that is gone.

The tour is the bullet list under "A short tour" in the README's Layout section. Each bullet names its
folder first (a backticked path ending in ``/``), then modules relative to it (``loop.py``); a module
given with a slash (``rl/trainer.py``, ``tasks/keys.py``) is relative to the bullet's folder when that
resolves, else to the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("colar_core", "colar_infra", "tasks", "flows")


def _tour_bullets(readme: str) -> list[str]:
    start = readme.index("A short tour")
    end = readme.index("\n## ", start)
    bullets: list[str] = []
    for line in readme[start:end].splitlines():
        if line.startswith("- "):
            bullets.append(line)
        elif bullets and line.startswith("  "):
            bullets[-1] += " " + line.strip()
    return bullets


def tour_modules(readme: str) -> set[str]:
    """Repository-relative paths of the modules the tour names."""
    named = set()
    for bullet in _tour_bullets(readme):
        tokens = re.findall(r"`([^`\s]+)`", bullet)
        folders = [t for t in tokens if t.endswith("/")]
        folder = folders[0] if folders else ""
        for token in tokens:
            if not token.endswith(".py"):
                continue
            local = f"{folder}{token}"
            named.add(local if (REPO / local).is_file() or "/" not in token else token)
    return named


def package_modules() -> set[str]:
    return {p.relative_to(REPO).as_posix() for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
            if p.name != "__init__.py"}


def test_the_tour_names_every_module_and_only_modules_that_exist():
    named = tour_modules((REPO / "README.md").read_text())
    missing = sorted(package_modules() - named)
    stale = sorted(m for m in named if not (REPO / m).is_file())
    assert not missing, "modules the README's tour leaves out:\n" + "\n".join(missing)
    assert not stale, "modules the README's tour names that do not exist:\n" + "\n".join(stale)


def test_the_tour_reader_resolves_folders_and_catches_a_missing_module():
    readme = ("## Layout\n\nA short tour:\n\n- **Training** (`colar_core/training/`): `loop.py` and\n"
              "  `stage.py`; `tasks/keys.py`.\n\n## Next\n")
    assert tour_modules(readme) == {"colar_core/training/loop.py", "colar_core/training/stage.py", "tasks/keys.py"}
    assert "colar_core/training/engines.py" in package_modules() - tour_modules(readme)
