"""Scenario files (YAML, version 1): the schema, the loader and its precise errors.

A scenario names the model, the prompt and generation lengths, the devices with their
compute and memory, the links between them and the traces that change the world while
tokens are generated. See the "Scenario file" section of docs/design.md for the contract.

Every bad input raises ``ScenarioError`` with one line per problem, each
``<file>: <key.path[index]>: <reason>``.

Relative ``gguf:`` and ``hf:`` paths are resolved against the scenario file's folder
(``load_scenario``) or the ``base_dir`` given to ``parse_scenario`` (else the working
directory), and stored resolved, so ``to_yaml`` writes absolute paths.

``prompt: TEXT`` without ``prompt_tokens`` estimates the prompt length as
``len(TEXT.split()) * 4 // 3 + 1`` tokens (about 0.75 words per token for English BPE
vocabularies) until a tokenizer is at hand; an explicit ``prompt_tokens`` wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from edgepart.llm.blocks import block_table
from edgepart.llm.gguf_meta import (
    GGUF_MISSING as GGUF_MISSING,  # re-exported: callers and tests use it
)
from edgepart.llm.gguf_meta import spec_from_gguf
from edgepart.llm.hf_config import load_hf_config
from edgepart.llm.model import PRESETS, ModelSpec, canonical_dtype, preset

MIB = 2**20
SCENARIO_VERSION = 1
DEVICE_NAME_PATTERN = r"^[A-Za-z0-9_-]+$"


class ScenarioError(ValueError):
    """A scenario that cannot be used; str() is one '<file>: <key path>: <reason>' per line."""

    def __init__(self, origin: str, problems: list[tuple[str, str]]) -> None:
        self.origin = origin
        self.problems = problems  # (key path, reason); key path "" for the whole file
        super().__init__(
            "\n".join(f"{origin}: {path}: {why}" if path else f"{origin}: {why}"
                      for path, why in problems)
        )


# Numbers are strict so that `true` is not read as 1 and "10" is not read as 10;
# a strict float still takes a YAML integer.
Positive = Annotated[float, Strict(), Field(gt=0)]
NonNegative = Annotated[float, Strict(), Field(ge=0)]
PositiveInt = Annotated[int, Strict(), Field(ge=1)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
Fraction = Annotated[float, Strict(), Field(ge=0, lt=1)]
DeviceName = Annotated[str, Strict(), Field(pattern=DEVICE_NAME_PATTERN)]
Text = Annotated[str, Strict(), Field(min_length=1)]
Flag = Annotated[bool, Strict()]
DtypeName = Annotated[str, Strict(), AfterValidator(canonical_dtype)]


def _resolve(path: str, info: ValidationInfo) -> str:
    base = (info.context or {}).get("base_dir")
    p = Path(path).expanduser()
    return str(p if p.is_absolute() or base is None else Path(base) / p)


ModelPath = Annotated[str, Strict(), Field(min_length=1), AfterValidator(_resolve)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- model sources


class PresetModel(_Frozen):
    """A model shipped with edgepart, by name, optionally in another dtype."""

    preset: Text
    dtype: DtypeName | None = None

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; known: {', '.join(PRESETS)}")
        return v

    def spec(self) -> ModelSpec:
        """The preset's shapes."""
        return preset(self.preset, self.dtype)


class GgufModel(_Frozen):
    """Shapes read from a GGUF file's metadata."""

    gguf: ModelPath
    dtype: DtypeName | None = None  # default: the file's type (quantized files count as float16)

    def spec(self) -> ModelSpec:
        """The shapes in the file's metadata; raises ImportError, OSError or ValueError."""
        return spec_from_gguf(self.gguf, self.dtype)


class HfModel(_Frozen):
    """Shapes read from a Hugging Face model folder's config.json."""

    hf: ModelPath
    dtype: DtypeName | None = None  # default: config.json's torch_dtype

    def spec(self) -> ModelSpec:
        """The shapes in config.json; raises OSError or ValueError."""
        spec = load_hf_config(self.hf)
        if self.dtype is None:
            return spec
        return ModelSpec(**{**_spec_fields(spec), "dtype": self.dtype})


SHAPE_KEYS = ("layers", "d_model", "heads", "kv_heads", "d_ff", "vocab")


class ShapesModel(_Frozen):
    """A model given by its shapes."""

    layers: PositiveInt
    d_model: PositiveInt
    heads: PositiveInt
    kv_heads: PositiveInt
    d_ff: PositiveInt
    vocab: PositiveInt
    dtype: DtypeName = "float32"
    head_dim: PositiveInt | None = None
    ffn: Literal["swiglu", "gelu"] = "swiglu"
    tied_embeddings: Flag = False
    qkv_bias: Flag = False

    @model_validator(mode="after")
    def _consistent(self) -> ShapesModel:
        self.spec()  # ModelSpec checks divisibility; its ValueError names the keys
        return self

    def spec(self) -> ModelSpec:
        """These shapes as a ModelSpec named 'custom'."""
        return ModelSpec(
            name="custom",
            layers=self.layers,
            d_model=self.d_model,
            heads=self.heads,
            kv_heads=self.kv_heads,
            d_ff=self.d_ff,
            vocab=self.vocab,
            dtype=self.dtype,  # type: ignore[arg-type]  # canonical after validation
            head_dim=self.head_dim or 0,
            ffn=self.ffn,
            tied_embeddings=self.tied_embeddings,
            qkv_bias=self.qkv_bias,
        )


_MODEL_TAGS: dict[type, str] = {
    PresetModel: "model=preset",
    GgufModel: "model=gguf",
    HfModel: "model=hf",
    ShapesModel: "model=shapes",
}


def _model_kind(v: Any) -> str | None:
    if isinstance(v, BaseModel):
        return _MODEL_TAGS.get(type(v))
    if not isinstance(v, Mapping):
        return None
    kinds = [k for k in ("preset", "gguf", "hf") if k in v]
    if any(k in v for k in SHAPE_KEYS):
        kinds.append("shapes")
    return f"model={kinds[0]}" if len(kinds) == 1 else None


ModelSource = Annotated[
    Union[  # noqa: UP007  # Tag annotations need the Union spelling
        Annotated[PresetModel, Tag("model=preset")],
        Annotated[GgufModel, Tag("model=gguf")],
        Annotated[HfModel, Tag("model=hf")],
        Annotated[ShapesModel, Tag("model=shapes")],
    ],
    Discriminator(
        _model_kind,
        custom_error_type="model_kind",
        custom_error_message=(
            "must be a mapping with exactly one of preset, gguf, hf or explicit shapes "
            "(layers, d_model, heads, kv_heads, d_ff, vocab)"
        ),
    ),
]


# ---------------------------------------------------------------- devices and links


class Device(_Frozen):
    """One device: its compute (GFLOP/s) and the memory edgepart may use (MiB)."""

    name: DeviceName
    compute_gflops: Positive
    memory_mib: Positive
    source: Flag = False


class LinkSpec(_Frozen):
    """Bandwidth (Mbit/s) and one-way latency (ms) of a link."""

    bandwidth_mbit: Positive = 1000.0
    latency_ms: NonNegative = 1.0


class LinkPair(_Frozen):
    """A symmetric link between devices a and b; latency defaults to links.default's."""

    a: DeviceName
    b: DeviceName
    bandwidth_mbit: Positive
    latency_ms: NonNegative | None = None


class Links(_Frozen):
    """The default link between any two devices, and the pairs that differ from it."""

    default: LinkSpec = LinkSpec()
    pairs: tuple[LinkPair, ...] = ()


# ---------------------------------------------------------------- traces


class _Trace(_Frozen):
    at_token: NonNegativeInt | None = None
    at_s: NonNegative | None = None

    kind: ClassVar[str] = ""

    @model_validator(mode="after")
    def _one_trigger(self) -> _Trace:
        if (self.at_token is None) == (self.at_s is None):
            raise ValueError("give exactly one trigger: at_token or at_s")
        return self


class LoadTrace(_Trace):
    """From the trigger on, background_load of the device's compute is taken by others."""

    kind: ClassVar[str] = "load"
    device: DeviceName
    background_load: Fraction


class MemoryTrace(_Trace):
    """From the trigger on, the device offers memory_mib MiB to edgepart."""

    kind: ClassVar[str] = "memory"
    device: DeviceName
    memory_mib: Positive


class LinkTrace(_Trace):
    """From the trigger on, the link between the two devices has this bandwidth (and latency).

    Bandwidth 0 cuts a link with the source: the other device is lost (after the data
    plane's probe timeout, live) until a later trace gives the link a rate again."""

    kind: ClassVar[str] = "link"
    link: tuple[DeviceName, DeviceName]
    bandwidth_mbit: NonNegative
    latency_ms: NonNegative | None = None  # None keeps the link's latency


class FailTrace(_Trace):
    """At the trigger the device dies."""

    kind: ClassVar[str] = "fail"
    device: DeviceName
    fail: Literal[True]


class JoinTrace(_Trace):
    """At the trigger the device comes online holding nothing: back after a fail, or for the
    first time (a device whose first fail or join trace is a join starts offline)."""

    kind: ClassVar[str] = "join"
    device: DeviceName
    join: Literal[True]


_TRACE_ACTIONS = {
    "background_load": "load",
    "memory_mib": "memory",
    "link": "link",
    "fail": "fail",
    "join": "join",
}


def _trace_kind(v: Any) -> str | None:
    if isinstance(v, _Trace):
        return f"trace={v.kind}"
    if not isinstance(v, Mapping):
        return None
    kinds = [kind for key, kind in _TRACE_ACTIONS.items() if key in v]
    return f"trace={kinds[0]}" if len(kinds) == 1 else None


Trace = Annotated[
    Union[  # noqa: UP007
        Annotated[LoadTrace, Tag("trace=load")],
        Annotated[MemoryTrace, Tag("trace=memory")],
        Annotated[LinkTrace, Tag("trace=link")],
        Annotated[FailTrace, Tag("trace=fail")],
        Annotated[JoinTrace, Tag("trace=join")],
    ],
    Discriminator(
        _trace_kind,
        custom_error_type="trace_kind",
        custom_error_message=(
            "must be a mapping with exactly one change: background_load, memory_mib, "
            "link (with bandwidth_mbit), fail or join"
        ),
    ),
]

_TAGS = frozenset(_MODEL_TAGS.values()) | {f"trace={k}" for k in _TRACE_ACTIONS.values()}


# ---------------------------------------------------------------- the scenario


def estimate_prompt_tokens(prompt: str) -> int:
    """Tokens of a prompt estimated from its words (about 0.75 words per token)."""
    return len(prompt.split()) * 4 // 3 + 1


class Scenario(_Frozen):
    """One scenario file, validated; immutable."""

    version: Literal[1]
    name: Text
    model: ModelSource
    prompt: str | None = None
    prompt_tokens: PositiveInt
    generate_tokens: PositiveInt
    replan_every: PositiveInt = 8
    weights_from: Literal["disk", "peer"] = "disk"
    devices: tuple[Device, ...] = Field(min_length=1)
    links: Links = Links()
    traces: tuple[Trace, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _estimate_prompt(cls, data: Any) -> Any:
        if (
            isinstance(data, Mapping)
            and data.get("prompt_tokens") is None
            and isinstance(data.get("prompt"), str)
        ):
            return {**data, "prompt_tokens": estimate_prompt_tokens(data["prompt"])}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        problems = _cross_check(self)
        if problems:
            raise PydanticCustomError(
                "scenario",
                "{detail}",
                {"detail": "; ".join(f"{p}: {r}" for p, r in problems), "problems": problems},
            )
        return self

    # -- derived views

    @cached_property
    def _spec(self) -> ModelSpec:
        return self.model.spec()

    def model_spec(self) -> ModelSpec:
        """The model's shapes (read once from the preset, GGUF or config.json)."""
        return self._spec

    @property
    def device_names(self) -> tuple[str, ...]:
        """Device names in file order."""
        return tuple(d.name for d in self.devices)

    @property
    def offline_at_start(self) -> frozenset[str]:
        """Devices that join later: their first fail or join trace (in token order) is a join."""
        first: dict[str, tuple[int, bool]] = {}
        for t in self.traces:
            if isinstance(t, FailTrace | JoinTrace) and t.at_token is not None:
                seen = first.get(t.device)
                if seen is None or t.at_token < seen[0]:
                    first[t.device] = (t.at_token, isinstance(t, JoinTrace))
        return frozenset(name for name, (_, joins) in first.items() if joins)

    @property
    def source_index(self) -> int:
        """Index in `devices` of the source device."""
        return next(i for i, d in enumerate(self.devices) if d.source)

    @property
    def source_name(self) -> str:
        """Name of the device holding embedding, LM head and sampling."""
        return self.devices[self.source_index].name

    @property
    def final_context(self) -> int:
        """Cached positions after the last generated token (prompt + generated tokens)."""
        return self.prompt_tokens + self.generate_tokens

    def device(self, name: str) -> Device:
        """The device of that name; raises KeyError."""
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(f"no device named {name!r}")

    @cached_property
    def _link_table(self) -> dict[frozenset[str], tuple[float, float]]:
        default_lat = self.links.default.latency_ms
        return {
            frozenset((p.a, p.b)): (
                p.bandwidth_mbit,
                default_lat if p.latency_ms is None else p.latency_ms,
            )
            for p in self.links.pairs
        }

    def link(self, a: str, b: str) -> tuple[float, float]:
        """(bandwidth Mbit/s, latency ms) between two distinct devices; raises KeyError."""
        names = self.device_names
        for n in (a, b):
            if n not in names:
                raise KeyError(f"no device named {n!r}")
        if a == b:
            raise KeyError(f"no link from {a!r} to itself")
        d = self.links.default
        return self._link_table.get(frozenset((a, b)), (d.bandwidth_mbit, d.latency_ms))

    def to_yaml(self) -> str:
        """This scenario as a YAML document that load_scenario reads back to an equal one."""
        data = _tidy_numbers(self.model_dump(mode="json", exclude_none=True))
        for device in data["devices"]:
            if not device["source"]:
                del device["source"]
        return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def _spec_fields(spec: ModelSpec) -> dict[str, Any]:
    return {k: getattr(spec, k) for k in ModelSpec.__dataclass_fields__ if k != "extra"}


class _Dumper(yaml.SafeDumper):
    """Writes flat mappings and lists on one line (one device, link or trace a line)."""


def _flat(value: Any) -> bool:
    if isinstance(value, list):
        return all(not isinstance(v, dict | list) for v in value)
    return not isinstance(value, dict)


def _represent_dict(dumper: _Dumper, data: dict) -> yaml.Node:
    flow = all(_flat(v) for v in data.values())
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flow)


def _represent_list(dumper: _Dumper, data: list) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=_flat(data))


_Dumper.add_representer(dict, _represent_dict)
_Dumper.add_representer(list, _represent_list)


def _tidy_numbers(x: Any) -> Any:
    # 1024.0 -> 1024 so written files read like hand-written ones; strict floats take ints.
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, dict):
        return {k: _tidy_numbers(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_tidy_numbers(v) for v in x]
    return x


def _cross_check(s: Scenario) -> list[tuple[str, str]]:
    """Problems that involve several keys: names, sources, links, traces, memory fit."""
    problems: list[tuple[str, str]] = []
    first_at: dict[str, int] = {}
    for i, d in enumerate(s.devices):
        if d.name in first_at:
            problems.append(
                (f"devices[{i}].name",
                 f"duplicate device name {d.name!r} (also devices[{first_at[d.name]}])")
            )
        else:
            first_at[d.name] = i
    sources = [i for i, d in enumerate(s.devices) if d.source]
    if not sources:
        problems.append(("devices", "no device has source: true; exactly one must"))
    for i in sources[1:]:
        names = ", ".join(s.devices[j].name for j in sources)
        problems.append(
            (f"devices[{i}].source", f"several sources ({names}); exactly one device may be")
        )

    def unknown(name: str) -> str:
        return f"unknown device {name!r}; devices are {', '.join(first_at)}"

    seen_pairs: dict[frozenset[str], int] = {}
    for i, p in enumerate(s.links.pairs):
        for key in ("a", "b"):
            if getattr(p, key) not in first_at:
                problems.append((f"links.pairs[{i}].{key}", unknown(getattr(p, key))))
        if p.a == p.b:
            problems.append((f"links.pairs[{i}].b", "a link joins two different devices"))
        pair = frozenset((p.a, p.b))
        if pair in seen_pairs:
            problems.append(
                (f"links.pairs[{i}]",
                 f"duplicate link {p.a}-{p.b} (also links.pairs[{seen_pairs[pair]}])")
            )
        seen_pairs.setdefault(pair, i)

    for i, t in enumerate(s.traces):
        if isinstance(t, LinkTrace):
            for k, name in enumerate(t.link):
                if name not in first_at:
                    problems.append((f"traces[{i}].link[{k}]", unknown(name)))
            if t.link[0] == t.link[1]:
                problems.append((f"traces[{i}].link", "a link joins two different devices"))
            source = [d.name for d in s.devices if d.source]
            if t.bandwidth_mbit == 0 and source and source[0] not in t.link:
                problems.append(
                    (f"traces[{i}].bandwidth_mbit",
                     f"0 cuts a link, and only a link with the source ({source[0]}) can be "
                     "cut: it cuts the other device off")
                )
        elif t.device not in first_at:  # type: ignore[union-attr]
            problems.append((f"traces[{i}].device", unknown(t.device)))  # type: ignore[union-attr]
        if t.at_token is not None and t.at_token >= s.generate_tokens:
            problems.append(
                (f"traces[{i}].at_token",
                 f"must be < generate_tokens ({s.generate_tokens}): "
                 f"token {t.at_token} is never generated")
            )

    problems.extend(_membership_problems(s, sources))
    try:
        spec = s.model_spec()
    except ImportError as e:
        problems.append((f"model.{_model_key(s)}", str(e)))
        return problems
    except (OSError, ValueError, KeyError, IndexError) as e:
        reason = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        problems.append((f"model.{_model_key(s)}", str(reason)))
        return problems
    if len(sources) == 1:
        problems.extend(_memory_problems(s, spec, sources[0]))
    return problems


def _membership_problems(s: Scenario, sources: list[int]) -> list[tuple[str, str]]:
    """Fail and join traces of each device must alternate, in token order."""
    problems: list[tuple[str, str]] = []
    changes: dict[str, list[int]] = {}
    for i, t in enumerate(s.traces):
        if isinstance(t, FailTrace | JoinTrace):
            changes.setdefault(t.device, []).append(i)
    source = s.devices[sources[0]].name if len(sources) == 1 else None
    for device, indices in changes.items():
        timed = [i for i in indices if s.traces[i].at_token is None]
        if timed:
            if any(isinstance(s.traces[i], JoinTrace) for i in indices):
                problems.append(
                    (f"traces[{timed[0]}].at_s",
                     f"{device} has a join trace: its fail and join traces need at_token")
                )
            continue
        indices.sort(key=lambda i: s.traces[i].at_token)  # type: ignore[arg-type, return-value]
        online = not isinstance(s.traces[indices[0]], JoinTrace)
        if not online and device == source:
            problems.append(
                (f"traces[{indices[0]}].join", "the source device is online from the start")
            )
        for i in indices:
            t = s.traces[i]
            joins = isinstance(t, JoinTrace)
            if joins == online and i != indices[0]:
                state = "online" if online else "offline"
                problems.append(
                    (f"traces[{i}].{t.kind}",
                     f"{device} is already {state} at token {t.at_token}")
                )
            online = joins
    return problems


def _model_key(s: Scenario) -> str:
    return {PresetModel: "preset", GgufModel: "gguf", HfModel: "hf"}.get(type(s.model), "layers")


def _memory_problems(s: Scenario, spec: ModelSpec, source: int) -> list[tuple[str, str]]:
    table = block_table(spec)
    n = s.final_context
    need = float(table.memory_bytes(n).sum()) + table.source_weight_bytes
    have = sum(d.memory_mib for d in s.devices) * MIB
    problems = []
    if need > have:
        problems.append(
            ("model",
             f"{spec.name} needs {need / MIB:.1f} MiB at the last token (context {n}: weights, "
             f"KV cache, embedding and LM head) but the devices have {have / MIB:.1f} MiB "
             "together")
        )
    pinned = table.source_weight_bytes / MIB
    if s.devices[source].memory_mib < pinned:
        problems.append(
            (f"devices[{source}].memory_mib",
             f"the source holds the embedding and LM head ({pinned:.1f} MiB) but has "
             f"{s.devices[source].memory_mib:g} MiB")
        )
    return problems


# ---------------------------------------------------------------- loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable; SafeLoader reports it below
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; raises ScenarioError naming file, key and reason."""
    origin = str(path)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(origin, [("", "no such file")]) from None
    except IsADirectoryError:
        raise ScenarioError(origin, [("", "is a folder, not a scenario file")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError(origin, [("", f"cannot read: {e}")]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ScenarioError(origin, [("", f"{where}YAML syntax error: {e.problem}")]) from None
    except yaml.YAMLError as e:
        raise ScenarioError(origin, [("", f"YAML syntax error: {e}")]) from None
    return parse_scenario(data, origin, base_dir=p.parent)


def parse_scenario(data: Any, origin: str, base_dir: str | Path | None = None) -> Scenario:
    """Validate a parsed scenario mapping; origin names it in errors (usually the file)."""
    if data is None:
        raise ScenarioError(origin, [("", "the scenario is empty")])
    if not isinstance(data, Mapping):
        raise ScenarioError(
            origin, [("", f"must be a mapping (key: value), not a {type(data).__name__}")]
        )
    try:
        return Scenario.model_validate(dict(data), context={"base_dir": base_dir})
    except ValidationError as e:
        raise ScenarioError(origin, _problems(e)) from None


def _problems(error: ValidationError) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for err in error.errors(include_url=False):
        if err["type"] == "scenario":
            out.extend(err["ctx"]["problems"])
            continue
        loc = [x for x in err["loc"] if x not in _TAGS]
        out.append((_key_path(loc), _reason(err, loc)))
    return out


def _key_path(loc: list[int | str]) -> str:
    path = ""
    for x in loc:
        path += f"[{x}]" if isinstance(x, int) else (f".{x}" if path else str(x))
    return path


_SIMPLE_REASONS = {
    "extra_forbidden": "unknown key",
    "missing": "required",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "model_type": "must be a mapping (key: value)",
    "model_attributes_type": "must be a mapping (key: value)",
    "dict_type": "must be a mapping (key: value)",
}


def _reason(err: Any, loc: list[int | str]) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "missing" and loc == ["prompt_tokens"]:
        return "required (or give prompt: TEXT to estimate it)"
    if kind == "literal_error" and loc == ["version"]:
        return f"must be {SCENARIO_VERSION} (this edgepart reads scenario version 1)"
    if kind in _SIMPLE_REASONS:
        return _SIMPLE_REASONS[kind]
    if kind == "greater_than":
        return f"must be > {ctx['gt']:g}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']:g}"
    if kind == "less_than":
        return f"must be < {ctx['lt']:g}"
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']:g}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx['pattern'].strip('^$')} (letters, digits, '_' and '-')"
    if kind == "literal_error":
        return f"must be {ctx['expected']}".replace("True", "true").replace("False", "false")
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} item(s)"
    if kind == "too_long":
        return f"must have at most {ctx['max_length']} item(s)"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return str(err["msg"]).replace("Input should be", "must be")
