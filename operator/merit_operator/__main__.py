"""`python -m merit_operator`: read the settings, win the leader election, run kopf.

Settings are read here, once, before any handler runs; the handlers find them in kopf's memo.
With leader election on, a replica that does not hold the Lease runs no kopf at all (it only
answers /healthz) until the Lease is free; a leader that loses it exits at once.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from meritrun.errors import MeritRunError

from .settings import Settings

log = logging.getLogger("merit_operator")


def main() -> int:
    from .context import api_config

    try:
        settings = Settings.from_env()
        config = api_config(settings)  # no credentials: say so now, not in kopf's retry loop
    except MeritRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    elector, renewal = None, None
    if settings.leader_election:
        from .leader import elector_for, standby_health

        elector = elector_for(settings, config)
        with standby_health(settings.health_port):
            if not elector.wait_for_leadership(stop):
                return 0
        renewal = threading.Thread(target=elector.keep_renewing, args=(stop, _lost_leadership),
                                   name="lease-renewal", daemon=True)
        renewal.start()
    try:
        _run_kopf(settings)
    finally:
        stop.set()
        if elector is not None and renewal is not None:
            renewal.join(elector.timing.renew_deadline)  # no renewal after the release
            elector.release()
    return 0


def _lost_leadership() -> None:
    """Another replica may act from now on: stop acting at once (client-go exits too)."""
    log.critical("leader election lost: exiting so that only one replica acts")
    logging.shutdown()
    os._exit(1)


def _run_kopf(settings: Settings) -> None:
    """kopf until SIGTERM/SIGINT. No stop_flag: a lost Lease ends the process at once, and a
    threading.Event flag would leave kopf's waiter thread blocking the interpreter's exit."""
    import kopf

    from . import handlers  # noqa: F401 - registers the handlers

    liveness = (f"http://0.0.0.0:{settings.health_port}/healthz"
                if settings.health_port else None)
    kopf.run(
        standalone=True,  # no kopf peering: one replica acts, chosen by our Lease
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=liveness,
        memo=kopf.Memo(settings=settings),
    )


if __name__ == "__main__":
    sys.exit(main())
