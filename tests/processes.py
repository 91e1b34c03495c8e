"""Running the project under torchrun from a test: 2 CPU processes (gloo), one thread each."""
import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
TORCHRUN_ENV = {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1"}


def torchrun_command(script, *argv, processes: int = 2) -> list:
    """`torchrun --standalone --nproc_per_node <processes> script argv` as a command line."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(processes), str(script), *map(str, argv)]


def run_script(tmp_path, source: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """`source` written to a file and run by 2 processes; each should print "ok <rank>" as one
    write (print(f"ok {rank}\\n", end="", flush=True)), so that the lines do not interleave."""
    script = Path(tmp_path) / "script.py"
    script.write_text(source)
    return subprocess.run(torchrun_command(script), cwd=PROJECT, capture_output=True, text=True,
                          timeout=timeout, env=TORCHRUN_ENV)


def every_process_ok(done: subprocess.CompletedProcess) -> bool:
    return done.returncode == 0 and all(f"ok {r}" in done.stdout for r in (0, 1))
