"""Testbed fidelity: the Docker testbed's shaped links, CPU shares, per-token predictions, capacity.

Every part runs containers of the edgepart image (``--image``, default ``edgepart:latest``,
pinned to its image id when the run starts, so a rebuild by someone else mid-run changes
nothing) on networks this benchmark creates with ``--internal``; every container and
network is named ``tbf-<pid>-...`` (compose projects ``edgepart-tbf-...-<pid>``) and removed
again, also on errors and Ctrl-C. The image's Python files of its packages
(``edgepart.emulator.images.PACKAGES``) are compared with this tree's (sha256) and the result is
recorded under ``image``.

Modules (each part's docstring says what it measures and its target):

- ``__main__``: the command line, the parts in turn, the summary tables and the JSON;
- ``links``: part 1, iperf3 through ``edgepart.device_agent.tc.TcShaper``'s htb classes;
- ``compute``: part 2, block times in CPU-limited containers against the host profile;
- ``tokens``: part 3, measured against predicted per token on the testbed;
- ``capacity``: part 4, how many device containers this machine holds;
- ``runs``: one bounded ``run_docker`` of parts 3 and 4, with its watchdog and memory;
- ``docker_calls``: every docker CLI call of the benchmark, and the programs' shipping;
- ``programs/``: ``shaper.py`` (part 1) and ``compute.py`` (part 2), which run inside the
  containers: their text is passed to ``python -c`` there, as the image holds the edgepart
  packages but not the benchmarks.

The machine's load is not controlled (others may run containers); the 1-minute load
average is recorded at the start and end of every part, and before parts 2 to 4 the
benchmark waits up to ``--settle`` seconds for it to fall to ``--quiet-load`` (recorded).
Every wait is bounded (docker calls, iperf3, the container programs, and each testbed run,
whose ``testbed`` container a watchdog kills when its budget is spent or 30 s after the
controller's container exited with an error: the driver itself would wait for hours). A
part that fails is recorded with its error and the next part runs.

Parts 3 and 4 render the containers' commands with this tree's ``edgepart.emulator.compose`` and run
them with the image's code: when the image is older than the tree (see ``image``), a run
can fail on a command-line option the image does not know yet; ``--build`` rebuilds the
image from this tree first (``edgepart.emulator.images.build_image``, offline).

Run: ``.venv/bin/python -m benchmarks.testbed_fidelity [--quick] [--parts links compute
tokens capacity] [--image TAG] [--build] [--seconds T] [--sustain S] [--capacity-sizes N ...]
[--capacity-tokens N] [--settle S] [--quiet-load L] [--out DIR]``. Writes
DIR/testbed_fidelity.json; the testbed runs' compose projects go under DIR/docker/.
"""

MODEL = "smollm2-135m"  # the model of parts 2 and 4
