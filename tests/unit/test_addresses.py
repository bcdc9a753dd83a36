"""The outbound policy's own table of special-purpose addresses, on every Python the
project runs on: ``ipaddress`` calls some of them global on one version and not another."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from devtools import gpu_kit
from devtools.harness import ROOT

# Address -> refused (True) or allowed (False), whatever the Python.
TABLE = {
    "2002:7f00:1::": True,  # 6to4 of 127.0.0.1
    "2002:a00:1::": True,  # 6to4 of 10.0.0.1
    "2002:808:808::": False,  # 6to4 of 8.8.8.8
    "fec0::1": True,  # site-local
    "64:ff9b:1::1": True,  # local-use NAT64
    "64:ff9b::7f00:1": True,  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe": True,  # NAT64 of 169.254.169.254, the cloud metadata service
    "64:ff9b::808:808": False,  # NAT64 of 8.8.8.8
    "100::1": True,  # discard-only
    "::ffff:127.0.0.1": True,  # IPv4-mapped
    "::ffff:8.8.8.8": False,
    "::ffff:0:7f00:1": True,  # IPv4-translated
    "2001:0:4136:e378:8000:63bf:3fff:fdd2": True,  # Teredo, client 192.0.2.45
    "2001:0:808:808:8000:63bf:80ff:fffe": True,  # Teredo, client 127.0.0.1
    "::1": True,
    "fe80::1": True,
    "fc00::1": True,
    "ff02::1": True,
    "2606:4700:4700::1111": False,
    "127.0.0.1": True,
    "10.1.2.3": True,
    "169.254.169.254": True,
    "100.64.0.1": True,
    "8.8.8.8": False,
}

VERDICTS = """
import ipaddress, json, sys
from sdxl_controlnet.addresses import refused_because
table = json.load(sys.stdin)
json.dump({a: refused_because(ipaddress.ip_address(a)) is not None for a in table}, sys.stdout)
"""


def verdicts(python: str) -> dict[str, bool]:
    ran = subprocess.run(
        [python, "-I", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{VERDICTS}"],
        input=json.dumps(list(TABLE)),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(ran.stdout)


def test_the_table_holds_on_this_python() -> None:
    assert verdicts(sys.executable) == TABLE


@pytest.mark.skipif(
    (python_312 := gpu_kit.python_312()) is None, reason="no Python 3.12 here (GPU_KIT_PYTHON)"
)
def test_the_table_holds_on_python_3_12() -> None:
    assert verdicts(python_312) == TABLE
