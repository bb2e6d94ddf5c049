"""The link-shaping program of part 1: runs in the sending container, fed rates on stdin.

``links.part_links`` ships it into the container as ``docker exec -i <sender> python -u -c
<this file's text> <receiver's IP>`` (the image has ``device_agent``, not the benchmarks).
It sets up ``edgepart.device_agent.tc.TcShaper`` on the interface towards the receiver, prints one
JSON line ``{"ready": true, "ifname": ...}``, then for each line on stdin (a rate in
Mbit/s, or ``none``) shapes the link and prints one JSON line: the tc verb (``add`` for a
new class, ``change`` in place), the class id and the rate the kernel reports, or the error.
"""

import json
import sys

from edgepart.device_agent.tc import TcShaper, interface_for


def main() -> None:
    """Shape the link to argv[1] at each rate read from stdin, one JSON answer per line."""
    peer = sys.argv[1]
    ifname = interface_for(peer)
    shaper = TcShaper(ifname)
    shaper.setup()
    print(json.dumps({"ready": True, "ifname": ifname}), flush=True)
    for line in sys.stdin:
        word = line.strip()
        if not word:
            continue
        try:
            verb = "change" if shaper.classid(peer) is not None else "add"
            shaper.shape(peer, None if word == "none" else float(word))
            print(json.dumps({"ok": True, "verb": verb, "classid": shaper.classid(peer),
                              "kernel_mbit": shaper.rates().get(peer)}), flush=True)  # fmt: skip
        except Exception as exc:
            print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)


if __name__ == "__main__":
    main()
