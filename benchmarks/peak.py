"""Run a command; print, as the last line, a JSON object with that command's own peak RSS.

    python benchmarks/peak.py svdq compress ...
"""
import json
import os
import subprocess
import sys

proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
code = os.waitstatus_to_exitcode(status)
sys.stdout.flush()
print(json.dumps({"peak_rss_mb": round(usage.ru_maxrss / 1024), "returncode": code}))
sys.exit(code)
