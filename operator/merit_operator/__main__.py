"""`python -m merit_operator`: read the settings, then run kopf with our handlers.

Settings are read here, once, before any handler runs; the handlers find them in kopf's memo.
"""

from __future__ import annotations

import logging
import sys

from meritrun.errors import MeritRunError

from .settings import Settings


def main() -> int:
    from .context import api_config

    try:
        settings = Settings.from_env()
        api_config(settings)  # no credentials: say so now, not in kopf's retry loop
    except MeritRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import kopf

    from . import handlers  # noqa: F401 - registers the handlers

    liveness = (f"http://0.0.0.0:{settings.health_port}/healthz"
                if settings.health_port else None)
    kopf.run(
        standalone=True,  # one replica (Recreate): no peering objects to maintain
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=liveness,
        memo=kopf.Memo(settings=settings),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
