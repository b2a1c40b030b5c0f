"""The resident set of each `hytrain train` process a command starts, sampled every 2 ms: its peak and, at the
peak, the anonymous, file-backed and shared memory in it (/proc/PID/status). Used for the README's breakdown of
ZeRO-2's peak (issue 17):

    OMP_NUM_THREADS=1 python3 benches/memory/rss_at_peak.py -- hytrain launch --nproc-per-node 4 -- hytrain train ...
"""
import subprocess, sys, time, os, re
# usage: sample.py -- cmd...
cmd = sys.argv[sys.argv.index('--')+1:]
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ)
peaks = {}
t0 = time.time()
def children(pid):
    out = []
    try:
        for c in open(f'/proc/{pid}/task/{pid}/children').read().split():
            out.append(int(c)); out += children(int(c))
    except Exception: pass
    return out
import threading
lines = []
def reader():
    for l in p.stdout: lines.append(l.decode(errors='replace'))
th = threading.Thread(target=reader); th.start()
while p.poll() is None:
    for c in children(p.pid):
        try:
            s = open(f'/proc/{c}/status').read()
            cmdl = open(f'/proc/{c}/cmdline').read()
        except Exception: continue
        if ' train' not in cmdl.replace('\0',' '): continue
        d = dict(re.findall(r'(\w+):\s+(\d+) kB', s))
        rss = int(d.get('VmRSS',0))
        if rss > peaks.get(c, (0,))[0]:
            peaks[c] = (rss, time.time()-t0, int(d.get('RssAnon',0)), int(d.get('RssFile',0)), int(d.get('RssShmem',0)), int(d.get('VmHWM',0)))
    time.sleep(0.002)
th.join()
for c,(rss,t,a,f,s,hwm) in sorted(peaks.items()):
    print(f'pid {c}: peak sampled {rss/1024:.0f} MiB at {t:.2f}s anon {a/1024:.0f} file {f/1024:.0f} shmem {s/1024:.0f}; HWM {hwm/1024:.0f}')
print(''.join(l for l in lines if 'peak' in l.lower() or 'error' in l.lower())[-3000:])
