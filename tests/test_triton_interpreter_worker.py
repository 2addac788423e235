"""The shared interpreter process (tests/triton_interpreter.py) that the kernel tests' snippets run in:
a snippet's failure reaches the test, and snippets do not see each other's globals."""

import pytest

from conftest import run_in_triton_interpreter


def test_snippets_run_with_the_interpreter_set_and_their_own_globals():
    run_in_triton_interpreter("import os\nleft_behind = 1\nassert os.environ['TRITON_INTERPRET'] == '1'\nprint('ok')")
    out = run_in_triton_interpreter("print('ok' if 'left_behind' not in globals() else 'leaked')")
    assert out.strip() == "ok"


def test_a_failing_snippet_fails_the_test_and_the_next_one_starts_clean():
    with pytest.raises(AssertionError, match="ZeroDivisionError"):
        run_in_triton_interpreter("1 / 0")
    with pytest.raises(AssertionError):  # finished without printing ok
        run_in_triton_interpreter("x = 1")
    assert run_in_triton_interpreter("print('ok')").strip() == "ok"
