"""The short version of `make loadtest`: tools/loadtest.py with 8 streaming clients on
the tiny pooled model, some hanging up early; nothing lost, duplicated or corrupted,
no 5xx, every page back in the pool after each round."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("aiohttp")


def test_short_loadtest():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "loadtest.py"), "-m",
         os.path.join(ROOT, "tests", "data", "tiny-pooled-bias.gguf"), "--clients", "8",
         "--requests", "2", "--max-tokens", "24", "--max-prompt", "30", "--disconnect", "3",
         "--pool-mb", "1", "--json"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=120)
    assert out.returncode == 0, out.stdout
    report = json.loads(out.stdout)
    for r in report["rounds"]:
        assert r["requests"] == 16 and r["completed"] + r["disconnected"] == 16
        assert r["disconnected"] >= 1
        assert r["lost"] == r["corrupted"] == r["other_errors"] == 0
        assert r["pool_bytes_held_after"] == 0
