#!/usr/bin/env python3
"""What one migration stream carries on this host, against multifd channels.

Two QEMUs (TCG, stopped, no guest) with 1 GiB of RAM backed by files in /dev/shm, the
source's filled with random bytes (no zero pages), migrated over loopback with the
bandwidth cap lifted; prints MiB/s (transferred / (total - setup)) per run.
Usage: dd if=/dev/urandom of=/dev/shm/ss-src bs=1M count=1024; truncate -s 1G /dev/shm/ss-dst;
       python3 bench/single-stream.py CHANNELS RUNS   (CHANNELS 0: one stream); rm /dev/shm/ss-*
"""
import json, socket, subprocess, time, sys, os
def qmp(path):
    s = socket.socket(socket.AF_UNIX); 
    for _ in range(100):
        try: s.connect(path); break
        except OSError: time.sleep(0.1)
    f = s.makefile('rw')
    f.readline()
    def cmd(c, **a):
        f.write(json.dumps({'execute': c, 'arguments': a}) + '\n'); f.flush()
        while True:
            r = json.loads(f.readline())
            if 'return' in r or 'error' in r: return r
    cmd('qmp_capabilities'); return cmd
def vm(name, mem, incoming):
    a = ['qemu-system-x86_64', '-machine', 'q35,memory-backend=m', '-accel', 'tcg', '-m', '1G', '-display', 'none', '-nodefaults', '-S',
         '-object', f'memory-backend-file,id=m,size=1G,mem-path={mem},share=on', '-qmp', f'unix:/tmp/{name}.sock,server=on,wait=off']
    if incoming: a += ['-incoming', 'defer']
    return subprocess.Popen(a)
channels = int(sys.argv[1])
res = []
for run in range(int(sys.argv[2])):
    src, dst = vm('s', '/dev/shm/ss-src', False), vm('d', '/dev/shm/ss-dst', True)
    try:
        qs, qd = qmp('/tmp/s.sock'), qmp('/tmp/d.sock')
        if channels >= 2:
            for q in (qs, qd):
                q('migrate-set-capabilities', capabilities=[{'capability': 'multifd', 'state': True}])
                q('migrate-set-parameters', **{'multifd-channels': channels})
        print(qs('migrate-set-parameters', **{'max-bandwidth': 100 << 30}), qs('query-migrate-parameters')['return']['max-bandwidth'])
        qd('migrate-incoming', uri='tcp:127.0.0.1:47000')
        qs('migrate', uri='tcp:127.0.0.1:47000')
        while True:
            st = qs('query-migrate')['return']
            if st.get('status') in ('completed', 'failed'): break
            time.sleep(0.05)
        ram = st['ram']; t = st['total-time'] - st.get('setup-time', 0)
        res.append(round(ram['transferred'] / 2**20 / (t / 1000)))
        print(st['status'], ram['transferred'] >> 20, 'MiB', t, 'ms', res[-1], 'MiB/s', flush=True)
    finally:
        src.kill(); dst.kill(); src.wait(); dst.wait()
print('channels', channels, 'MiB/s', sorted(res))
