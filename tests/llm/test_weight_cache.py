"""The per-block weight cache: exact tensors, atomic entries, a new directory per checkpoint."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from edgepart.llm.runtime import BlockHost
from edgepart.llm.safetensors_source import open_hf_model
from edgepart.llm.weight_cache import WeightCache, checkpoint_checksum

MOVABLE = ("L0.g0", "L0.g1", "L0.proj", "L0.ffn", "L1.g1", "L1.ffn")


@dataclass
class Opened:
    path: Path
    source: object
    arch: object


@pytest.fixture
def llama(tiny_checkpoint) -> Opened:
    path = tiny_checkpoint("llama-gqa")
    return Opened(path, *open_hf_model(path))


def test_a_cached_block_holds_exactly_the_checkpoints_weights(llama, tmp_path):
    cache = WeightCache.for_checkpoint(llama.path, tmp_path)
    built = BlockHost("a", llama.source, llama.arch, weight_cache=cache)
    for name in MOVABLE:
        built.load(name)
        assert name in cache
    again = BlockHost("b", llama.source, llama.arch, weight_cache=cache)
    plain = BlockHost("c", llama.source, llama.arch)
    for name in MOVABLE:
        cached, direct = again.load(name).weight_tensors(), plain.load(name).weight_tensors()
        assert cached.keys() == direct.keys()
        for key, tensor in direct.items():
            assert torch.equal(cached[key], tensor), (name, key)


def test_blocks_read_from_the_cache_compute_what_the_checkpoint_does(llama, tmp_path):
    cache = WeightCache.for_checkpoint(llama.path, tmp_path)
    BlockHost("warm", llama.source, llama.arch, weight_cache=cache).load("L0.ffn")
    x = torch.randn(3, llama.arch.spec.d_model)
    cached = BlockHost("a", llama.source, llama.arch, weight_cache=cache).load("L0.ffn")
    direct = BlockHost("b", llama.source, llama.arch).load("L0.ffn")
    assert torch.equal(cached(x), direct(x))


def test_a_changed_checkpoint_gets_a_new_directory(tiny_checkpoint, tmp_path):
    original = tiny_checkpoint("llama-gqa")
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    first = WeightCache.for_checkpoint(copy, tmp_path / "cache")
    assert WeightCache.for_checkpoint(copy, tmp_path / "cache").directory == first.directory
    config = copy / "config.json"
    config.write_text(config.read_text().replace("}", ', "edited": true}', 1))
    os.utime(config, ns=(1, 1))  # a new stamp as well as new bytes
    assert WeightCache.for_checkpoint(copy, tmp_path / "cache").directory != first.directory


def test_the_checksum_is_remembered_by_path_size_and_mtime(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("gpt2")
    first = checkpoint_checksum(path, tmp_path)
    memo = (tmp_path / "checksums.json").read_text()
    assert first in memo
    assert checkpoint_checksum(path, tmp_path) == first


def test_a_damaged_entry_is_rebuilt_from_the_checkpoint(llama, tmp_path):
    cache = WeightCache.for_checkpoint(llama.path, tmp_path)
    BlockHost("a", llama.source, llama.arch, weight_cache=cache).load("L1.ffn")
    cache.path("L1.ffn").write_bytes(b"not a safetensors file")
    assert cache.get("L1.ffn") is None
    block = BlockHost("b", llama.source, llama.arch, weight_cache=cache).load("L1.ffn")
    direct = BlockHost("c", llama.source, llama.arch).load("L1.ffn")
    held = block.weight_tensors()
    assert all(torch.equal(held[k], v) for k, v in direct.weight_tensors().items())
    assert cache.get("L1.ffn") is not None


def test_a_failed_write_leaves_no_entry(llama, tmp_path, monkeypatch):
    cache = WeightCache.for_checkpoint(llama.path, tmp_path)

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("edgepart.llm.weight_cache.save_file", broken)
    with pytest.raises(OSError):
        cache.put("L0.ffn", {"w": torch.zeros(2)})
    assert "L0.ffn" not in cache
    assert not [p for p in cache.directory.iterdir() if p.name.startswith(".")]


def test_pinned_blocks_are_not_cached(llama, tmp_path):
    cache = WeightCache.for_checkpoint(llama.path, tmp_path)
    host = BlockHost("s", llama.source, llama.arch, weight_cache=cache)
    host.load("embed")
    host.load("head")
    assert "embed" not in cache and "head" not in cache
