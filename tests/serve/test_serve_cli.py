"""``onboardlm serve`` as a process: it prints its address, answers, and on SIGTERM lets the running
request finish, stops admitting and exits 0; bad input is one line and exit code 2."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.slow

COMMAND = [sys.executable, "-m", "onboardlm.cli", "serve"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _wait_for_address(process: subprocess.Popen, seconds: float = 180.0) -> str:
    lines: list[str] = []

    def read() -> None:
        for line in process.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for line in lines:
            if match := re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line):
                return match.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"no address printed: {''.join(lines)}")


def test_sigterm_lets_the_running_request_finish_then_exits_0(tiny_model: Path) -> None:
    args = [
        str(tiny_model),
        "--port",
        "0",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--shutdown-timeout",
        "30",
    ]
    process = subprocess.Popen(
        COMMAND + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV
    )
    try:
        url = _wait_for_address(process)
        api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        name = api.models.list().data[0].id
        assert name == str(tiny_model)
        stream = api.completions.create(
            model=name, prompt="Hello", max_tokens=200, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = iter(stream)
        first = next(chunks)
        process.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"
        assert len(first.choices[0].text + "".join(c.choices[0].text for c in rest)) > 0
        assert process.wait(timeout=60) == 0
        with pytest.raises(openai.APIConnectionError):
            api.models.list()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_model_that_does_not_exist_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        COMMAND + [str(tmp_path / "missing"), "--port", "0"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing" in errors[0]
