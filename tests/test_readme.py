"""The README's runnable snippets ("Coming from Hugging Face", "torch.compile", "DDP/FSDP"), taken
from README.md as they stand and run on the 2-rank gloo pool. A snippet opens with
`dist.init_process_group("gloo")`, as under torchrun; here the pool's processes already hold the
group, so that call is a no-op while the snippet runs."""

import re
from pathlib import Path
from unittest import mock

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_snippet(heading: str) -> str:
    """The first ```python block of the README section titled ``heading`` (any level; lines inside
    code blocks are never headings)."""
    section, in_code, code = None, False, None
    for line in README.read_text().splitlines(keepends=True):
        if line.startswith("```"):
            if section is not None and in_code and code is not None:
                return "".join(code)
            in_code = not in_code
            if section is not None and in_code and line.strip() == "```python":
                code = []
        elif in_code:
            if code is not None:
                code.append(line)
        elif line.startswith("#"):
            if section is not None:
                break
            if line.lstrip("#").strip() == heading:
                section = heading
    raise AssertionError(f"README has no section {heading!r} with a python block")


def job_run_snippet(rank, world_size, group, code):
    """Runs ``code`` as a script on this rank; the group is the one the snippet would create."""
    import torch.distributed as dist

    def already_initialized(backend=None, *args, **kwargs):
        assert backend == "gloo" and dist.is_initialized()

    with mock.patch.object(dist, "init_process_group", already_initialized):
        exec(compile(code, f"README.md (rank {rank})", "exec"), {"__name__": "__main__"})


def test_coming_from_hugging_face(pool2):
    pytest.importorskip("transformers", minversion="5")
    pytest.importorskip("safetensors")
    pool2.run(job_run_snippet, readme_snippet("Coming from Hugging Face"), timeout=300)


@pytest.mark.slow
def test_torch_compile(pool2):
    pool2.run(job_run_snippet, readme_snippet("torch.compile"), timeout=600)


def test_ddp_fsdp(pool2):
    pool2.run(job_run_snippet, readme_snippet("DDP/FSDP"), timeout=300)


def test_setup_commands_stay_two():
    """The README opens with exactly two set-up commands."""
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(first_block.strip().splitlines()) == 2
