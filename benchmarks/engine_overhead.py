"""Engine overhead: per-token decode time of block-wise execution against transformers.

SmolLM2-135M-Instruct (the ``smollm2-135m`` preset GGUF, Q4_1 dequantised to float32) runs
greedy decoding of the same raw prompt (its first 32 tokens) two ways in one process:

- edgepart: ``edgepart.llm.runtime.monolithic`` (every block on one host), ``greedy``;
- transformers: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name,
  dtype=float32)`` and its own ``generate(do_sample=False, use_cache=True)``.

Timing: a timestamp (time.perf_counter) is taken each time a new token has been chosen:
in edgepart by greedy's ``on_token`` callback, in transformers by a LogitsProcessor
(called once per generation step, right after that step's forward pass; the greedy argmax
and stopping checks of the previous step lie between two calls). The interval between two
consecutive timestamps is one decode step (forward of one token over the KV cache plus
choosing the token); the first interval, which contains the prefill, is left out. So N new
tokens give N-1 decode steps per run on either side, measured the same way.

One warm-up generation each, then --rounds rounds alternating the order of the two engines
(so slow phases of a shared machine hit both); the per-step times of all rounds are pooled
and their median is reported. Both engines use the same torch thread count
(torch.get_num_threads(), or --threads; recorded). The load of the machine is not
controlled: other processes may run at the same time (the 1-minute load average is
recorded), so compare the medians, not single steps. The greedy token ids of both engines
are compared and the result reported.

Caution on a shared machine: with 2 torch threads on 2 cores and another process holding
a core, each 3-D scaled_dot_product_attention call of a KV-group block (90 per token here,
against transformers' 30 4-D calls) was seen to wait about one scheduler tick (8-24 ms) for
its second thread, giving ~2 s per token against ~70 ms for transformers. When the load
average in the JSON is high, rerun, or use --threads 1 (which avoids the wait).

Run: ``.venv/bin/python -m benchmarks.engine_overhead [--quick] [--rounds R]
[--new-tokens N] [--threads T] [--out DIR]``. Writes DIR/engine_overhead.json.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import (
    BenchParser,
    ByMode,
    console,
    environment,
    load1,
    load_note,
    load_span,
    num,
    print_table,
    print_targets,
    stats,
    target,
    timed,
    write_json,
)
from edgepart.llm.loader import OpenModel, open_model
from edgepart.llm.runtime import PartitionedModel, monolithic

NAME = "engine_overhead"
MODEL = "smollm2-135m"
PROMPT_TOKENS = 32
DEFAULTS = {"new_tokens": ByMode(64, 8), "rounds": ByMode(3, 1)}
TARGET_RATIO = 1.3
PROMPT_TEXT = (
    "The printing press was invented in the fifteenth century by Johannes Gutenberg, a "
    "goldsmith from Mainz. Before it, books were copied by hand, which made them rare and "
    "expensive. Within fifty years"
)


def prompt_ids(om: OpenModel) -> list[int]:
    """The first PROMPT_TOKENS ids of the raw prompt (with the model's own framing)."""
    ids = om.tokenizer.encode(PROMPT_TEXT)
    if len(ids) < PROMPT_TOKENS:
        raise RuntimeError(f"prompt has only {len(ids)} tokens; {PROMPT_TOKENS} are needed")
    return ids[:PROMPT_TOKENS]


def load_transformers(om: OpenModel):
    """transformers' own model from the same GGUF file (float32, eval mode)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = om.file.path
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    return model


def run_edgepart(
    model: PartitionedModel, prompt: list[int], n: int, eos: int | None
) -> tuple[list[int], list[float]]:
    """Greedy ids and the timestamps (s) taken when each new token was chosen, from start."""
    stamps: list[float] = []
    t0 = time.perf_counter()
    ids = model.greedy(
        prompt, n, eos_token_id=eos, on_token=lambda i, m: stamps.append(time.perf_counter())
    )
    return ids, [t - t0 for t in stamps]


def run_transformers(
    model: Any, prompt: list[int], n: int, eos: int | None
) -> tuple[list[int], list[float]]:
    """Greedy ids from generate and the timestamps (s) of each step's logits processing."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            stamps.append(time.perf_counter())
            return scores

    x = torch.tensor([prompt], dtype=torch.long)
    t0 = time.perf_counter()
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=n,
        do_sample=False,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=eos,
        logits_processor=LogitsProcessorList([Stamp()]),
    )
    ids = out[0, len(prompt) :].tolist()
    return ids, [t - t0 for t in stamps]


def decode_steps(stamps: list[float]) -> list[float]:
    """Per-step decode times: differences of consecutive stamps (prefill interval dropped)."""
    return [b - a for a, b in itertools.pairwise(stamps)]


def make_parser() -> BenchParser:
    """The command line: the common options, rounds, new tokens and threads."""
    parser = BenchParser(NAME, __doc__.splitlines()[0], DEFAULTS)
    parser.add_argument(
        "--rounds", type=int, default=None,
        help=f"timed generations per engine after the warm-up ({DEFAULTS['rounds']})",
    )
    parser.add_argument(
        "--new-tokens", type=int, default=None,
        help=f"new tokens per generation ({DEFAULTS['new_tokens']})",
    )
    parser.add_threads_option("torch threads for both engines")
    return parser


Engine = Callable[[], tuple[list[int], list[float]]]


def alternate(engines: dict[str, Engine], rounds: int) -> tuple[dict, dict, dict]:
    """A warm-up generation per engine, then rounds in alternating order; per engine the
    ids of every generation, the pooled decode steps (s) and each round's first stamp (s)."""
    ids: dict[str, list[list[int]]] = {k: [] for k in engines}
    steps: dict[str, list[float]] = {k: [] for k in engines}
    first: dict[str, list[float]] = {k: [] for k in engines}
    with torch.no_grad():
        for name, run in engines.items():
            warm_ids, _ = run()
            ids[name].append(warm_ids)
        for r in range(rounds):
            order = list(engines) if r % 2 == 0 else list(engines)[::-1]
            for name in order:
                got, stamps = engines[name]()
                ids[name].append(got)
                steps[name].extend(decode_steps(stamps))
                first[name].append(stamps[0])
                console.print(
                    f"  round {r + 1} {name}: {len(got)} tokens, median step "
                    f"{1000 * stats(decode_steps(stamps))['median']:.1f} ms"
                )
    return ids, steps, first


def print_per_token(title: str, per_token: dict[str, Any], first: dict[str, list[float]],
                    caption: str) -> None:  # fmt: skip
    """One line per engine: decode step statistics, tokens/s and the first token's time."""
    print_table(
        title,
        ["engine", "median", "p95", "min", "tokens/s", "first token"],
        [
            (
                name,
                f"{1000 * s['median']:.2f} ms",
                f"{1000 * s['p95']:.2f} ms",
                f"{1000 * s['min']:.2f} ms",
                num(1.0 / s["median"], ".1f"),
                f"{1000 * stats(first[name])['median']:.0f} ms",
            )
            for name, s in per_token.items()
        ],
        caption=caption,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to DIR/engine_overhead.json."""
    parser = make_parser()
    args = parser.parse(argv)
    rounds, n_new = args.rounds, args.new_tokens
    if n_new < 2:
        parser.error("--new-tokens must be at least 2 (one decode step)")
    threads = torch.get_num_threads()
    load_start = load1()

    console.rule(f"loading {MODEL}")
    om = open_model(MODEL)
    prompt = prompt_ids(om)
    eos = om.tokenizer.eos_id
    ours, ours_load_s = timed(monolithic, om.source, om.arch)
    hf, hf_load_s = timed(load_transformers, om)
    console.print(
        f"  {om.file.path.name}: edgepart blocks loaded in {ours_load_s:.1f} s, "
        f"transformers in {hf_load_s:.1f} s; {threads} torch threads"
    )

    engines: dict[str, Engine] = {
        "edgepart": lambda: run_edgepart(ours, prompt, n_new, eos),
        "transformers": lambda: run_transformers(hf, prompt, n_new, eos),
    }
    console.rule(f"warm-up, then {rounds} round(s) of {n_new} new tokens")
    ids, steps, first = alternate(engines, rounds)

    reference = ids["transformers"][0]
    identical = all(run == reference for runs in ids.values() for run in runs)
    deterministic = {k: all(run == runs[0] for run in runs) for k, runs in ids.items()}
    per_token = {k: stats(v) for k, v in steps.items()}
    ratio = per_token["edgepart"]["median"] / per_token["transformers"]["median"]
    targets = [target("edgepart / transformers per-token time", ratio, TARGET_RATIO)]

    print_per_token(
        f"decode time per token, {MODEL}, prompt {len(prompt)} tokens, {threads} threads "
        f"(median over {len(steps['edgepart'])} steps)",
        per_token,
        first,
        caption=f"{load_note(load_start)}; 'first token' includes the prefill",
    )
    console.print(
        f"ratio edgepart / transformers: [bold]{ratio:.3f}x[/]; greedy ids identical: "
        f"{'[green]yes[/]' if identical else '[red]NO[/]'} ({len(reference)} tokens)"
    )
    print_targets(targets, fmt=lambda v: num(v, ".3f") + "x")

    data = {
        "benchmark": NAME,
        "quick": args.quick,
        "environment": environment(),
        "setup": {
            "model": MODEL,
            "file": om.file.path.name,
            "dtype": "float32",
            "prompt_tokens": len(prompt),
            "new_tokens": n_new,
            "rounds": rounds,
            "warmup_generations": 1,
            "threads": threads,
            "timing": (
                "perf_counter stamp per chosen token (edgepart: greedy on_token; transformers: "
                "LogitsProcessor); decode step = difference of consecutive stamps, prefill "
                "interval dropped; all rounds pooled; machine load not controlled"
            ),
        },
        "load_average_1min": load_span(load_start),
        "load_s": {"edgepart": ours_load_s, "transformers": hf_load_s},
        "per_token_s": per_token,
        "tokens_per_s": {k: 1.0 / v["median"] for k, v in per_token.items()},
        "first_token_s": {k: stats(v) for k, v in first.items()},
        "ratio": ratio,
        "token_ids": {"edgepart": ids["edgepart"][0], "transformers": reference},
        "token_ids_identical": identical,
        "deterministic": deterministic,
        "targets": targets,
    }
    write_json(args.out, NAME, data)
    return data


if __name__ == "__main__":
    main()
