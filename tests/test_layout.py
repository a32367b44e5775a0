"""The repository layout never shadows Hugging Face's `tokenizers` package."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

PROBE = "import miditok, tokenizers, unmask; print(tokenizers.__file__)"


def _run(args: list[str]) -> str:
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_hf_tokenizers_imports_from_site_packages_when_run_from_repo_root():
    assert "site-packages" in _run([sys.executable, "-c", PROBE])


def test_hf_tokenizers_wins_under_python_m_from_repo_root(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "probe"],
        cwd=REPO,
        env={"PYTHONPATH": f"{REPO}:{tmp_path}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "site-packages" in out.stdout


def test_top_level_folders_are_not_regular_packages():
    for folder in ("tokenizers", "models", "service", "workers", "corpus", "engine"):
        assert not (REPO / folder / "__init__.py").exists(), folder


def test_our_vocabulary_is_reachable_as_unmask_tokenizers():
    out = _run([sys.executable, "-c", "import unmask.tokenizers.vocab as v; print(v.__name__)"])
    assert out == "unmask.tokenizers.vocab"
