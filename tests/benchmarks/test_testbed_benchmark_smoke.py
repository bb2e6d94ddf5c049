"""Smoke test of the testbed benchmark: part 1 (kernel link shaping) of --quick into tmp_path.

It starts two containers of the edgepart image on an internal network of its own, shapes
the link with edgepart.device_agent.tc.TcShaper and measures it with iperf3 (about 20 s), so it
runs only where the Docker engine answers and the image exists (``edgepart testbed
build``); it never builds or pulls. It checks the JSON's shape and that the numbers are
finite and positive, never how close the goodput is to the configured rate: that is
measured by the benchmark itself.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from edgepart.emulator.images import DEFAULT_TAG, docker_available, image_exists

pytestmark = [
    pytest.mark.skipif(not docker_available(), reason="the Docker engine is not running"),
    pytest.mark.skipif(
        not image_exists(DEFAULT_TAG), reason=f"no image {DEFAULT_TAG} (edgepart testbed build)"
    ),
]

from benchmarks.testbed_fidelity.__main__ import main  # noqa: E402
from benchmarks.testbed_fidelity.links import DEFAULTS, RATES_MBIT  # noqa: E402

POSITIVE_KEYS = (
    "goodput_mbit",
    "expected_goodput_mbit",
    "kernel_rate_mbit",
    "seconds",
    "bytes_received",
    "sent_mbit",
    "mss",
)


def _ours(kind: str, prefix: str) -> list[str]:
    """Names of containers or networks docker still has with this run's prefix."""
    if kind == "containers":
        cmd = ["docker", "ps", "-a", "--format", "{{.Names}}"]
    else:
        cmd = ["docker", "network", "ls", "--format", "{{.Name}}"]
    out = subprocess.run(
        [*cmd, "--filter", f"name={prefix}"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return [n for n in out.split() if n.startswith(prefix)]


def test_quick_link_shaping(tmp_path: Path, positive, finite, quick_json) -> None:
    data = main(["--quick", "--parts", "links", "--out", str(tmp_path)])
    saved = quick_json(tmp_path, "testbed_fidelity")
    assert saved["setup"]["parts"] == ["links"]
    assert set(saved["parts"]) == {"links"}
    assert saved["image"]["id"].startswith("sha256:")
    assert isinstance(saved["image"]["code_matches_tree"], bool)

    links = saved["parts"]["links"]
    assert links["ok"] is True, links.get("error")
    assert positive(links["wall_s"])
    assert links["seconds_per_rate"] == DEFAULTS["seconds"].quick
    header = links["header"]
    assert header["mtu"] > 0 and 0 < header["factor"] < 1
    assert header["payload_bytes"] < header["frame_bytes"]

    rows = links["rows"]
    assert [r["rate_mbit"] for r in rows] == RATES_MBIT
    assert [r["tc_verb"] for r in rows] == ["add", "change", "change"]
    for r in rows:
        for key in POSITIVE_KEYS:
            assert positive(r[key]), key
        assert finite(r["error"]) and finite(r["raw_error"])
        assert r["expected_goodput_mbit"] < r["rate_mbit"]
        assert r["classid"] == "1:10"

    names = [t["target"] for t in saved["targets"]]
    assert names == [
        f"goodput error at {r:g} Mbit/s ({v})"
        for r, v in zip(RATES_MBIT, ["add", "change", "change"], strict=True)
    ]
    for t in saved["targets"]:
        assert finite(t["value"]) and t["value"] >= 0
    assert data["parts"]["links"]["ok"] is True

    prefix = f"tbf-{os.getpid()}-"
    assert _ours("containers", prefix) == []
    assert _ours("networks", prefix) == []
