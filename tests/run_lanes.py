"""`make test`'s runner: the suite as two pytest processes at once, so that tests that mostly wait overlap the rest.

The side lane holds the modules whose time is mostly waiting on clocks they do not control (the testbed's cuts and Ray's
node deaths, Ray's job API): about 200 s of wall time at about 60 % of one core. They start Ray clusters of their own
(`ray start` on free ports, the testbed's in its own network namespaces); a module on the session's
`ray.cluster_utils.Cluster` stays in the main lane, which holds the one such cluster (two at once broke the Ray
pipeline tests' placement). The main lane's output streams as it runs; the side lane's is printed after it. Given test paths or node ids, one pytest runs exactly those.

    python tests/run_lanes.py [pytest arguments ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

SIDE_LANE = ["tests/test_testbed.py", "tests/test_submit.py", "tests/test_ray_job.py"]
NO_TESTS = 5  # pytest's exit code when nothing was collected


def combined(codes: list[int]) -> int:
    """0 when every lane passed or had nothing selected (but not all of them); else the first failure's code."""
    ran = [c for c in codes if c != NO_TESTS]
    if not ran:
        return NO_TESTS
    return next((c for c in ran if c != 0), 0)


def main(args: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest"]
    if any(os.path.exists(a.split("::")[0]) for a in args if not a.startswith("-")):  # test paths or node ids
        return subprocess.call([*pytest, *args])
    with tempfile.TemporaryFile("w+") as side_log:
        side = subprocess.Popen(
            [*pytest, "-p", "no:cacheprovider", *SIDE_LANE, *args], stdout=side_log, stderr=subprocess.STDOUT
        )
        try:
            main_code = subprocess.call([*pytest, *(f"--ignore={path}" for path in SIDE_LANE), *args])
            side_code = side.wait()
        finally:
            if side.poll() is None:
                side.kill()
        side_log.seek(0)
        print(f"\n==== side lane: {' '.join(SIDE_LANE)} ====\n{side_log.read()}", flush=True)
    print(f"main lane exit code {main_code}, side lane exit code {side_code}")
    return combined([main_code, side_code])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
