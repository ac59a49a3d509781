"""`stagecoach testbed`: the command line of cluster/testbed.py (up, cut, heal, limit, status, down)."""

from __future__ import annotations

import argparse
import json

from stagecoach.cluster import testbed
from stagecoach.cluster.netns import require_root


def add_parser(sub) -> None:
    tb = sub.add_parser(
        "testbed",
        help="many hosts on one Linux machine (root): network namespaces, a Ray node in each, link cuts",
        description=testbed.__doc__,
    )
    cmds = tb.add_subparsers(dest="testbed_command", required=True)
    p = cmds.add_parser(
        "up", help="(re)make the testbed: N nodes + K spare ones, a Ray head outside them; prints its JSON"
    )
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument(
        "--spare",
        type=int,
        default=0,
        help="extra nodes no stage is placed on at first: where a stage on a lost node moves",
    )
    p.add_argument(
        "--bandwidth", default=None, help="shape every node's egress to this rate (tc units: 1gbit, 100mbit)"
    )
    p.add_argument("--subnet", default="10.213.7.0/24", help="the private /24 the testbed's addresses come from")
    p.add_argument(
        "--node-death-s",
        type=int,
        default=testbed.NODE_DEATH_S,
        help="seconds of silence after which Ray declares a node dead (its GCS pings each raylet every second)",
    )
    p = cmds.add_parser("cut", help="node NODE's link drops every packet silently (no reset, no closed socket)")
    p.add_argument("node", type=int)
    p.add_argument("--for", dest="for_s", type=float, default=None, help="heal it by itself after this many seconds")
    p = cmds.add_parser(
        "heal", help="restore node NODE's link (and its Ray worker, if Ray declared the node dead meanwhile)"
    )
    p.add_argument("node", type=int)
    p.add_argument("--after", type=float, default=0.0, help=argparse.SUPPRESS)
    p = cmds.add_parser(
        "limit", help="shape what node NODE sends to RATE (tbf on its egress; tc units: 20mbit); RATE off removes it"
    )
    p.add_argument("node", type=int)
    p.add_argument("rate")
    cmds.add_parser("status", help="print the testbed's JSON (with each node's link and Ray state)")
    cmds.add_parser("down", help="remove every namespace, link, bridge and process the testbed made")


def run(args: argparse.Namespace) -> int:
    c = args.testbed_command
    if c == "down":
        testbed.down()
        return 0
    if c == "up":
        bed = testbed.up(args.nodes, args.spare, args.bandwidth, args.subnet, args.node_death_s)
    elif c == "cut":
        bed = testbed.cut(args.node, args.for_s)
    elif c == "heal":
        bed = testbed.heal(args.node, args.after)
    elif c == "limit":
        bed = testbed.limit(args.node, args.rate)
    else:
        require_root()
        bed = testbed.Testbed.load()
    print(json.dumps(bed.summary()))
    return 0
