"""What a server loads to start and log a user in: httpx, pyjwt and cryptography (~17 MB of its resident memory
together) wait for the webhook, SSO or OTA request that needs them."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import SECRET

DEFERRED = ["httpx", "jwt", "cryptography", "polars", "pyarrow"]

PROGRAM = f"""
import json, sys
from webmacs import cli, server
from webmacs.app import create_app
from webmacs.security import create_access_token
from webmacs.settings import Settings

create_app(Settings(database_url="postgresql://nobody@127.0.0.1:1/none", secret_key={SECRET!r}))
create_access_token(user_id=1, role="admin", key={SECRET!r}, algorithm="HS256", minutes=1)
print(json.dumps([m for m in {DEFERRED!r} if m in sys.modules]))
"""


def test_the_app_and_a_login_load_no_http_client_jwt_library_or_dataframes() -> None:
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout.splitlines()[-1]) == []
