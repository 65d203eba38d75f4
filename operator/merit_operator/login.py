"""kopf's credentials, from the same ApiConfig the operator's own REST client uses.

A bearer token may live in a file (a kubeconfig's `tokenFile`, the in-cluster projected
service-account token that the kubelet rotates about hourly). kopf keeps what the login
handler returns until it expires, so the token is read from its file at each login and the
credentials expire after `reread_seconds` (MERITRUN_TOKEN_REREAD_SECONDS, 60): kopf then logs
in again and picks up a rotated token before the old one stops working.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import kopf

from .kubeapi import TOKEN_REREAD_SECONDS, ApiConfig


def connection_info(config: ApiConfig, *, now: datetime,
                    reread_seconds: float = TOKEN_REREAD_SECONDS) -> kopf.ConnectionInfo:
    """Credentials for kopf; an expiration only when the token comes from a file."""
    token, expiration = config.token, None
    if config.token_path:
        token = Path(config.token_path).read_text().strip()
        expiration = now + timedelta(seconds=reread_seconds)
    return kopf.ConnectionInfo(
        server=config.server, token=token or None, ca_data=config.ca_pem,
        certificate_data=config.cert_pem, private_key_data=config.key_pem,
        insecure=config.insecure or None, default_namespace=config.namespace,
        expiration=expiration)
