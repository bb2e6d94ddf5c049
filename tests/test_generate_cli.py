"""`edgepart generate` on the real SmolLM2 GGUF: whole, partitioned, and against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from edgepart.controller.cli import app

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
PROMPT = "The capital of France is"
NEW_TOKENS = 12


def generate(*args: str):
    return CliRunner().invoke(
        app, ["generate", "--model", "smollm2-135m", "--prompt", PROMPT, *args]
    )


@pytest.fixture(scope="module")
def reference(smollm2_path, transformers_smollm2):
    """transformers' tokenizer and model on the same GGUF file."""
    path = smollm2_path
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return tok, transformers_smollm2


def greedy(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def reference_ids(reference) -> list[int]:
    """transformers' own greedy continuation of the raw prompt."""
    tok, model = reference
    return greedy(model, tok(PROMPT, return_tensors="pt").input_ids, NEW_TOKENS)


def test_whole_model_matches_transformers(reference_ids):
    result = generate("--max-new-tokens", str(NEW_TOKENS), "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"output_token_ids", "text"}
    assert out["output_token_ids"] == reference_ids
    assert "Paris" in out["text"]


def test_partitioned_over_a_scenario_gives_the_same_tokens(reference_ids):
    result = generate(
        "--max-new-tokens", str(NEW_TOKENS), "--scenario", str(SCENARIOS / "demo.yaml"), "--json"
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["output_token_ids"] == reference_ids


def test_each_algorithm_of_a_list_places_and_generates_the_same_tokens(reference_ids):
    result = generate(
        "--max-new-tokens", str(NEW_TOKENS), "--scenario", str(SCENARIOS / "demo.yaml"),
        "-a", "edgeshard,galaxy", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    runs = json.loads(result.stdout)
    assert [r["algorithm"] for r in runs] == ["edgeshard", "galaxy"]
    assert all(r["output_token_ids"] == reference_ids for r in runs)


def test_chat_applies_the_models_template(reference):
    tok, model = reference
    ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    result = generate("--chat", "--max-new-tokens", "8", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["output_token_ids"] == greedy(model, ids, 8)


def test_text_output_without_json():
    result = generate("--max-new-tokens", "4")
    assert result.exit_code == 0, result.stderr
    assert "Paris" in result.stdout


def test_unknown_model_is_bad_input(tmp_path):
    result = CliRunner().invoke(
        app, ["generate", "--model", str(tmp_path / "nope.gguf"), "--prompt", "x"]
    )
    assert result.exit_code == 2
    assert "nope.gguf" in result.stderr
