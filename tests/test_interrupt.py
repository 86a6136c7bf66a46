"""Ctrl-C in the binaries (experiments.run and experiments.run_argparse): one line
`error: interrupted (Ctrl-C)`, exit status 130, promptly, whatever background threads are doing.

Each case runs a small program in a subprocess (the handler ends the process it runs in) that
says `ready` on stdout once it is where the interrupt should land.
"""

import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MESSAGE = "error: interrupted (Ctrl-C)"


def _interrupt(program: str, interrupts: int = 1, timeout: float = 60.0,
               ) -> subprocess.CompletedProcess:
    """Runs `program`, waits for its `ready` line, sends SIGINT `interrupts` times (each after
    the next `ready`), and returns how it ended (killed, and the test failed, after `timeout`)."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(program)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with proc:
        for _ in range(interrupts):
            line = proc.stdout.readline()
            assert line == "ready\n", (line, proc.stderr.read() if proc.poll() is not None else "")
            proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"still running {timeout} s after Ctrl-C")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_a_busy_background_thread_does_not_hold_the_exit():
    """A non-daemon thread still working (as orbax's checkpoint writer or a reader pool can be)
    made the interpreter's shutdown wait for it; the run now ends when the main thread has
    unwound."""
    result = _interrupt("""
        import threading, time
        import experiments

        def main(argv):
            threading.Thread(target=time.sleep, args=(3600,)).start()  # not a daemon
            print("ready", flush=True)
            time.sleep(3600)

        experiments.run(main)
    """)
    assert result.returncode == 130, result.stderr
    assert result.stderr == MESSAGE + "\n"


def test_unwinding_runs_cleanup_before_the_end(tmp_path):
    """The first Ctrl-C is a KeyboardInterrupt: `finally` blocks (temporary files removed) run."""
    marker = tmp_path / "cleaned"
    result = _interrupt(f"""
        import pathlib, time
        import experiments

        def main(argv):
            try:
                print("ready", flush=True)
                time.sleep(3600)
            finally:
                pathlib.Path({str(marker)!r}).write_text("yes")

        experiments.run(main)
    """)
    assert result.returncode == 130 and result.stderr == MESSAGE + "\n", result.stderr
    assert marker.read_text() == "yes"


def test_a_second_ctrl_c_ends_a_run_that_swallowed_the_first():
    """Python drops a KeyboardInterrupt raised in a weakref callback or `__del__`; simulated by a
    run that catches it and goes on. The next Ctrl-C ends it where it stands."""
    result = _interrupt("""
        import time
        import experiments

        def main(argv):
            for _ in range(2):
                try:
                    print("ready", flush=True)
                    time.sleep(3600)
                except KeyboardInterrupt:
                    pass

        experiments.run(main)
    """, interrupts=2)
    assert result.returncode == 130, result.stderr
    assert result.stderr == MESSAGE + "\n"


def test_a_swallowed_ctrl_c_ends_the_run_after_the_grace_period():
    result = _interrupt("""
        import time
        import experiments
        experiments.INTERRUPT_GRACE_S = 1.0

        def main(argv):
            try:
                print("ready", flush=True)
                time.sleep(3600)
            except KeyboardInterrupt:
                pass
            time.sleep(3600)  # goes on as if nothing happened

        experiments.run(main)
    """, timeout=30.0)
    assert result.returncode == 130, result.stderr
    assert result.stderr == MESSAGE + "\n"


def test_verbose_shows_the_traceback_then_the_line():
    result = _interrupt("""
        import sys, time
        import experiments

        def main(argv):
            print("ready", flush=True)
            time.sleep(3600)

        sys.argv = ["prog", "-v", "1"]
        experiments.run(main)
    """)
    assert result.returncode == 130, result.stderr
    assert "Traceback" in result.stderr and "KeyboardInterrupt" in result.stderr
    assert result.stderr.splitlines()[-1] == MESSAGE


def test_ctrl_c_while_a_binary_is_imported():
    """`python -m experiments.<binary>` imports this package first (sys.argv[0] is "-m" then),
    and the binary's imports take seconds: a Ctrl-C there printed a traceback of the imports."""
    result = _interrupt("""
        import sys, time
        sys.argv = ["-m"]  # as while python -m locates experiments.<binary>
        import experiments
        print("ready", flush=True)
        time.sleep(3600)  # the binary's imports
    """)
    assert result.returncode == 130, result.stderr
    assert result.stderr == MESSAGE + "\n"


def test_argparse_binaries_end_the_same_way():
    """The converters' mains (argparse) printed a traceback on Ctrl-C."""
    result = _interrupt("""
        import time
        import experiments

        def main():
            print("ready", flush=True)
            time.sleep(3600)
            return 0

        experiments.run_argparse(main)
    """)
    assert result.returncode == 130, result.stderr
    assert result.stderr == MESSAGE + "\n"
    done = subprocess.run([sys.executable, "-c", "import experiments; "
                           "experiments.run_argparse(lambda: 3)"], cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 3
