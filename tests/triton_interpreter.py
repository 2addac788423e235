"""One Python process with ``TRITON_INTERPRET=1`` that runs the tests' kernel snippets one after another.

Triton reads ``TRITON_INTERPRET`` when it is imported, so the tests run their GPU-kernel code in another
process. A fresh process per snippet cost ~4.3 s of imports (torch, triton, dtq) each, 17 times a suite; this
worker pays them once. Each snippet still gets its own globals and a reset torch.compile state
(``torch._dynamo.reset()``), and a snippet that fails takes the worker down with it, so the next one
starts clean. What snippets share is what any process shares after importing dtq: imported modules,
registered custom ops, module-level caches.

Protocol: one JSON string (the code) per line on the worker's stdin; one JSON object per line back
(``ok``, the snippet's ``stdout``, the ``error`` traceback) on a private copy of its stdout. Anything
else the snippet or a library prints to the real stdout goes to stderr, which is a file whose tail a
failure message shows.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import tempfile

_WORKER = r"""
import contextlib, io, json, os, sys, traceback
reply = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # stray writes to fd 1 (C code, subprocesses) go to stderr, not into the protocol
sys.stdout = sys.stderr
for line in sys.stdin:
    code = json.loads(line)
    out, ok, err = io.StringIO(), True, ""
    try:
        import torch

        torch._dynamo.reset()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<triton interpreter snippet>", "exec"), {"__name__": "__main__"})
    except BaseException:
        ok, err = False, traceback.format_exc()
    reply.write(json.dumps({"ok": ok, "stdout": out.getvalue(), "error": err}) + "\n")
    reply.flush()
"""


class InterpreterWorker:
    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.stderr = None

    def _start(self):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env={**os.environ, "TRITON_INTERPRET": "1"})

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            self.stderr.close()  # a restarted worker writes a new file

    def _stderr_tail(self, n: int = 3000) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-n:]

    def run(self, code: str, timeout: float) -> tuple[bool, str, str]:
        """``(ok, stdout, error)`` of ``code``; past ``timeout`` s the worker is killed and ok is False."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(code) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:  # timed out, or the worker died (its stderr says why)
            why = f"no reply within {timeout} s" if not ready else "the worker exited"
            tail = self._stderr_tail()
            self.stop()
            return False, "", f"{why}\n{tail}"
        reply = json.loads(line)
        if not reply["ok"]:
            reply["error"] += "\n--- worker stderr ---\n" + self._stderr_tail()
            self.stop()
        return reply["ok"], reply["stdout"], reply["error"]


WORKER = InterpreterWorker()
atexit.register(WORKER.stop)
