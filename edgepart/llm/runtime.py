"""Block-wise execution of a model over a placement, in one process: the reference runtime.

Each device is a BlockHost with its own blocks and caches. PartitionedModel walks the
layers in order (embedding -> per layer: every KV group, projection, FFN -> head),
handing tensors from one host to another as copies, as a wire would, and counting the
bytes that cross between devices. A model with every block on one host is the monolithic
reference path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from edgepart.llm.arch import Architecture
from edgepart.llm.blocks import PINNED_BLOCKS, block_table
from edgepart.llm.state import BlockState, block_state, dump_state, load_state
from edgepart.llm.tensors import TensorSource
from edgepart.llm.torch_blocks import (
    MOVABLE_KINDS,
    AnyBlock,
    EmbedBlock,
    FFNBlock,
    HeadBlock,
    KVGroupBlock,
    ProjBlock,
    RopeTable,
    block_from_weights,
    build_block,
    parse_block_name,
    weight_shapes,
)
from edgepart.llm.weight_cache import WeightCache

SOURCE_DEVICE = "source"


class BlockHost:
    """One device's blocks (weights and KV caches), keyed by block name."""

    def __init__(
        self,
        name: str,
        source: TensorSource,
        arch: Architecture,
        dtype: torch.dtype = torch.float32,
        weight_cache: WeightCache | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.arch = arch
        self.dtype = dtype
        #: dequantised weights of movable blocks, read instead of the checkpoint (float32)
        self.weight_cache = weight_cache if dtype == torch.float32 else None
        self.blocks: dict[str, AnyBlock] = {}
        self.rope = RopeTable(arch, dtype) if arch.positions == "rope" else None

    def load(self, block_name: str, weights: dict[str, torch.Tensor] | None = None) -> AnyBlock:
        """Build a block (``build``) and hold it; returns it."""
        if block_name in self.blocks:
            raise ValueError(f"{self.name} already holds {block_name}")
        block = self.build(block_name, weights)
        self.blocks[block_name] = block
        return block

    def build(self, block_name: str, weights: dict[str, torch.Tensor] | None = None) -> AnyBlock:
        """A block built from the source (only its slices), or from ``weights`` (a movable
        block's ``weight_tensors()`` from elsewhere: no source read), NOT held here (e.g. a
        block prepared for a coming switch; ``adopt`` holds it later). With a weight cache a
        movable block is read from it, and blocks built from the source are added to it."""
        cache = self.weight_cache
        movable = parse_block_name(block_name).kind in MOVABLE_KINDS
        if weights is None and cache is not None and movable:
            weights = cache.get(block_name)
            if weights is None:
                block = build_block(self.source, self.arch, block_name, self.dtype, rope=self.rope)
                cache.put(block_name, block.weight_tensors())
                return block
        if weights is not None:
            return block_from_weights(self.arch, block_name, weights, self.dtype, rope=self.rope)
        tied = None
        embed = self.blocks.get("embed")
        if block_name == "head" and isinstance(embed, EmbedBlock):
            tied = embed.wte
        return build_block(
            self.source, self.arch, block_name, self.dtype, rope=self.rope, tied_embedding=tied
        )

    def restore(self, state: BlockState) -> AnyBlock:
        """Hold a migrated block: from the state's weights if it carries them, else from the
        source; a KV group takes the state's cache. Returns the block."""
        block = self.load(state.block, weights=state.weights or None)
        if isinstance(block, KVGroupBlock) and state.keys is not None:
            assert state.values is not None
            block.set_cache(state.keys, state.values)
        return block

    def weights_of(self, block_name: str) -> BlockState:
        """A movable block's weights (a group with an empty cache), from the copy held here
        or built without holding it (from the weight cache or the source): what a peer
        without the checkpoint loads the block from."""
        weight_shapes(self.arch, block_name)  # ValueError unless a movable block of the model
        block = self.blocks.get(block_name)
        if block is None:
            block = self.build(block_name)  # from the weight cache, if there is one
        assert isinstance(block, KVGroupBlock | ProjBlock | FFNBlock)
        return block_state(block, self.arch.spec.name, with_weights=True, with_cache=False)

    def adopt(self, block: AnyBlock) -> None:
        """Take a block built elsewhere (e.g. restored from a migration state)."""
        if block.name in self.blocks:
            raise ValueError(f"{self.name} already holds {block.name}")
        if isinstance(block, KVGroupBlock) and self.rope is not None:
            block.rope = self.rope
        self.blocks[block.name] = block

    def drop(self, block_name: str) -> AnyBlock:
        """Remove a block (and its cache); returns it."""
        try:
            return self.blocks.pop(block_name)
        except KeyError:
            raise KeyError(f"{self.name} holds no block {block_name!r}") from None

    def __getitem__(self, block_name: str) -> AnyBlock:
        try:
            return self.blocks[block_name]
        except KeyError:
            raise KeyError(f"{self.name} holds no block {block_name!r}") from None

    def weight_bytes(self) -> int:
        """Bytes of all weights held."""
        return sum(b.weight_bytes() for b in self.held())

    def cache_bytes(self) -> int:
        """Bytes of all KV caches held (used positions)."""
        return sum(b.cache_bytes() for b in self.held() if isinstance(b, KVGroupBlock))

    def held(self) -> list[AnyBlock]:
        """The blocks held now, as a list taken at once: a device agent adds and drops blocks
        in one thread while another reports on them, and a dict iterated while it changes
        raises."""
        return list(self.blocks.values())


@dataclass
class Traffic:
    """Bytes and hand-offs that crossed between devices, per (from, to) pair."""

    bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    messages: dict[tuple[str, str], int] = field(default_factory=dict)
    migration_bytes: int = 0

    def add(self, src: str, dst: str, nbytes: int) -> None:
        """Record one hand-off."""
        key = (src, dst)
        self.bytes[key] = self.bytes.get(key, 0) + nbytes
        self.messages[key] = self.messages.get(key, 0) + 1

    @property
    def total_bytes(self) -> int:
        """All activation bytes that crossed devices."""
        return sum(self.bytes.values())


class PartitionedModel:
    """A model whose blocks live on several BlockHosts, executed layer by layer."""

    def __init__(
        self,
        source: TensorSource,
        arch: Architecture,
        placement: Mapping[str, str],
        dtype: torch.dtype = torch.float32,
        source_device: str = SOURCE_DEVICE,
    ) -> None:
        self.source = source
        self.arch = arch
        self.dtype = dtype
        self.table = block_table(arch.spec)
        known = set(self.table.names) | set(PINNED_BLOCKS)
        unknown = sorted(set(placement) - known)
        if unknown:
            raise ValueError(f"placement names unknown blocks: {', '.join(unknown)}")
        missing = [n for n in self.table.names if n not in placement]
        if missing:
            raise ValueError(
                f"placement misses {len(missing)} blocks, e.g. {', '.join(missing[:4])}"
            )
        self.placement: dict[str, str] = dict(placement)
        for pinned in PINNED_BLOCKS:
            self.placement.setdefault(pinned, source_device)
        self.hosts: dict[str, BlockHost] = {}
        # Embedding first, so a tied head on the same host can share its matrix.
        for name in (*PINNED_BLOCKS, *self.table.names):
            self._host(self.placement[name]).load(name)
        self.length = 0  # positions processed so far
        self.traffic = Traffic()

    def _host(self, device: str) -> BlockHost:
        host = self.hosts.get(device)
        if host is None:
            host = self.hosts[device] = BlockHost(device, self.source, self.arch, self.dtype)
        return host

    def block(self, name: str) -> AnyBlock:
        """The live block of that name, wherever it is."""
        return self.hosts[self.placement[name]][name]

    def _send(self, t: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        """Hand a tensor from one device to another: a copy, as the wire would make."""
        if src == dst:
            return t
        self.traffic.add(src, dst, t.numel() * t.element_size())
        return t.clone()

    # -- execution --
    @torch.no_grad()
    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Run T new tokens through every block; logits (vocab,) of the last one."""
        if token_ids.dim() != 1 or token_ids.numel() == 0:
            raise ValueError("token_ids must be a non-empty 1-D tensor")
        spec, place = self.arch.spec, self.placement
        at = place["embed"]
        embed = self.block("embed")
        assert isinstance(embed, EmbedBlock)
        hidden = embed(token_ids, self.length)
        for layer in range(spec.layers):
            proj_name = f"L{layer}.proj"
            proj_dev = place[proj_name]
            outs: list[torch.Tensor] = []
            # Groups are independent given the hidden state: in parallel on a real testbed.
            for g in range(spec.kv_heads):
                name = f"L{layer}.g{g}"
                dev = place[name]
                group = self.hosts[dev][name]
                assert isinstance(group, KVGroupBlock)
                out = group(self._send(hidden, at, dev))
                outs.append(self._send(out, dev, proj_dev))
            proj = self.hosts[proj_dev][proj_name]
            assert isinstance(proj, ProjBlock)
            hidden = proj(torch.cat(outs, dim=-1), self._send(hidden, at, proj_dev))
            ffn_name = f"L{layer}.ffn"
            ffn_dev = place[ffn_name]
            ffn = self.hosts[ffn_dev][ffn_name]
            assert isinstance(ffn, FFNBlock)
            hidden = ffn(self._send(hidden, proj_dev, ffn_dev))
            at = ffn_dev
        head = self.block("head")
        assert isinstance(head, HeadBlock)
        logits = head(self._send(hidden, at, place["head"]))
        self.length += token_ids.numel()
        return logits

    def prefill(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Process the prompt at once (every block sees all T tokens); last position's logits."""
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        return self.forward(ids)

    def decode(self, token_id: int) -> torch.Tensor:
        """Process one token at the next position; its logits (vocab,)."""
        return self.forward(torch.tensor([int(token_id)], dtype=torch.long))

    def reset(self) -> None:
        """Forget every cached position (weights stay)."""
        for host in self.hosts.values():
            for b in host.blocks.values():
                if isinstance(b, KVGroupBlock):
                    b.reset()
        self.length = 0

    def greedy(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        eos_token_id: int | None = None,
        on_token: Callable[[int, PartitionedModel], None] | None = None,
    ) -> list[int]:
        """Greedy continuation (argmax, first index on ties) of a prompt; the new tokens only.

        ``on_token(i, model)`` runs after the i-th new token is chosen (1-based) and before it
        is fed back: the place to migrate blocks mid-generation.
        """
        if max_new_tokens <= 0:
            return []
        self.reset()
        logits = self.prefill(prompt_ids)
        out: list[int] = []
        while True:
            token = int(torch.argmax(logits))
            out.append(token)
            if on_token is not None:
                on_token(len(out), self)
            if len(out) >= max_new_tokens or token == eos_token_id:
                return out
            logits = self.decode(token)

    # -- migration --
    def migrate(self, block_name: str, to_device: str, with_weights: bool = False) -> int:
        """Move a block to another device mid-generation; returns the bytes sent.

        The block travels as edgepart.llm.state bytes: a KV group's cache, and for every kind its
        weights when ``with_weights`` (the new host then reads nothing from the source);
        without them the new host loads the weights from the source.
        """
        kind = parse_block_name(block_name).kind
        if kind in PINNED_BLOCKS:
            raise ValueError(f"{block_name} is pinned to the source device")
        src = self.placement.get(block_name)
        if src is None:
            raise KeyError(f"no block named {block_name!r}")
        if src == to_device:
            return 0
        old = self.hosts[src][block_name]
        assert isinstance(old, KVGroupBlock | ProjBlock | FFNBlock)
        target = self._host(to_device)
        data = dump_state(block_state(old, self.arch.spec.name, with_weights=with_weights))
        sent = len(data)
        target.restore(load_state(data, expect_model=self.arch.spec.name))
        self.hosts[src].drop(block_name)
        self.placement[block_name] = to_device
        self.traffic.migration_bytes += sent
        return sent


def monolithic(
    source: TensorSource, arch: Architecture, dtype: torch.dtype = torch.float32
) -> PartitionedModel:
    """Every block on one host: the reference path."""
    table = block_table(arch.spec)
    return PartitionedModel(source, arch, dict.fromkeys(table.names, SOURCE_DEVICE), dtype)
