"""``vqscope proxy``: sit between a vhost-user front-end and a back-end that
is not ours, forward everything both ways, and serve what passes on an
introspection socket, until SIGINT/SIGTERM (inspector/vhost_user/proxy.py)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from ..errors import InspectorError
from ..vhost_user.proxy import VhostUserProxy

DEVICE_TYPES = ("net", "block")


def make_proxy(args: argparse.Namespace) -> VhostUserProxy:
    """A VhostUserProxy for the ``proxy`` arguments (not started)."""
    if args.listen == args.connect:
        raise InspectorError(f"--listen and --connect are the same path ({args.listen}): the proxy would "
                             f"connect to itself")
    introspect = args.introspect or args.listen + ".introspect"
    return VhostUserProxy(args.listen, args.connect, introspect,
                          introspect_any_uid=args.introspect_any_uid, device_type=args.device_type,
                          count_notifications=args.count_notifications)


def proxy_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="vqscope %(message)s", stream=sys.stderr)
    proxy = make_proxy(args)

    def on_signal(signum, frame):
        proxy.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"vqscope proxy: front-ends on {args.listen}, back-end {args.connect}; introspection on "
          f"{proxy.introspect_path}; kick/call fds "
          f"{'interposed (counted)' if args.count_notifications else 'forwarded unchanged'}; Ctrl-C to end",
          file=sys.stderr, flush=True)
    proxy.serve_forever()
    return 0
