"""A public checkpoint's tokenizer: HF `tokenizers` is never shadowed by the repository's
`tokenizers/` folder, and chat templates render in a sandbox."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from public_fixtures import write_checkpoint

from unmask.errors import InvalidArgument
from unmask.tokenizers.hf import HFTokenizer, hf_tokenizers

REPO = Path(__file__).resolve().parents[1]


def _is_site_packages(path: str) -> bool:
    return "site-packages" in path and not path.startswith(str(REPO / "tokenizers"))


def test_hf_tokenizers_resolves_to_site_packages_inside_pytest():
    module = hf_tokenizers()
    assert hasattr(module, "Tokenizer")
    assert _is_site_packages(module.__file__)
    import tokenizers  # the name as miditok and the fixtures import it

    assert tokenizers is module


@pytest.mark.parametrize(
    "argv",
    [
        # `python -c` from the repository root puts the root on sys.path first
        ["-c", "import tokenizers, unmask.tokenizers.hf as h; print(h.hf_tokenizers().__file__)"],
        # as does `python -m` (the CLI entry)
        ["-m", "unmask", "--help"],
    ],
)
def test_hf_tokenizers_resolves_to_site_packages_from_the_repo_root(argv):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    probe = [sys.executable, *argv]
    out = subprocess.run(probe, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    if argv[0] == "-c":
        assert _is_site_packages(out.stdout.strip()), out.stdout
    check = subprocess.run(
        [sys.executable, "-c", "import tokenizers; print(tokenizers.__file__)"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert _is_site_packages(check.stdout.strip()), check.stdout


@pytest.fixture(scope="module")
def sdar_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("sdar"), "sdar")


def test_chat_template_renders_and_encodes_special_tokens(sdar_dir):
    tok = HFTokenizer(sdar_dir)
    text = tok.render_chat([{"role": "user", "content": "Write a haiku about rain"}])
    assert text == "<|im_start|>user\nWrite a haiku about rain<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.token_id("<|im_start|>")


def test_chat_template_is_sandboxed(sdar_dir):
    tok = HFTokenizer(sdar_dir)
    tok.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InvalidArgument) as err:
        tok.render_chat([{"role": "user", "content": "x"}])
    assert err.value.field == "chat"


def test_chat_template_file_wins_over_tokenizer_config(sdar_dir, tmp_path):
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(sdar_dir, d)
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    )
    assert HFTokenizer(d).render_chat([{"role": "user", "content": "x"}]) == "[x]"
