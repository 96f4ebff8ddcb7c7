"""Where a command's memory peaks: the svdq CLI run in this process while a thread reads its
RSS (/proc/self/status) every 0.2 s and, at each new maximum 10 MB above the last, keeps the
main thread's svdq frames; the last eight maxima go to stderr at exit.

    python benchmarks/peak_where.py compress MODEL --ratio 0.3 ... -o OUT

Its level is this process's (a thread and /proc reads beside the run), not `peak.py`'s; use it
for where, `peak.py` for how much."""
import atexit, sys, threading, time, traceback
main_id = threading.main_thread().ident
best = [0, None]
log = []
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) // 1024
def sample():
    while True:
        r = rss()
        if r > best[0] + 10:
            f = sys._current_frames().get(main_id)
            stack = [f"{fs.filename.split('svdq/')[-1]}:{fs.lineno} {fs.name}" for fs in traceback.extract_stack(f) if 'svdq/' in fs.filename]
            best[:] = [r, stack]
            log.append((r, time.time(), stack[-6:]))
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True).start()
def report():
    for r, t, s in log[-8:]:
        print(r, 'MB', ' <- '.join(reversed(s)), file=sys.stderr)
atexit.register(report)
from svdq.cli import main
sys.argv[0] = 'svdq'
main()  # as the `svdq` command: its allocator settings too (`stream.tame_malloc`)
