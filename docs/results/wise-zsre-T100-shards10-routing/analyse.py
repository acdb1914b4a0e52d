import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
thr = rows[0]['memory_thresholds']
print('memories', len(thr), 'thresholds', [round(t, 3) for t in thr])
per = len(thr) and 100 // len(thr)
for kind in ['rel', 'gen', 'loc']:
    rs = [r for r in rows if r['kind'] == kind]
    c = collections.Counter()
    by_group = collections.defaultdict(collections.Counter)
    for r in rs:
        sc = {k: v for k, v in r['scores']}
        mem = [sc.get(f'memory.{j}', 0.0) for j in range(len(thr))]
        own = r['i'] // per
        ans = r['answer']
        above = [j for j in range(len(thr)) if mem[j] > thr[j]]
        ratio = max(range(len(thr)), key=lambda j: mem[j] / thr[j])
        ratio_pick = f'memory.{ratio}' if mem[ratio] > thr[ratio] else 'original'
        c['n'] += 1
        c['answer=own'] += ans == f'memory.{own}'
        c['answer=original'] += ans == 'original'
        c['own above its threshold'] += own in above
        c['own has max raw score'] += max(range(len(thr)), key=lambda j: mem[j]) == own
        c['ratio rule picks own'] += ratio_pick == f'memory.{own}'
        c['ratio rule picks original'] += ratio_pick == 'original'
        c['any memory above threshold'] += bool(above)
        g = r['i'] // 10
        by_group[g]['own/thr'] += mem[own] / thr[own] / 10
        by_group[g]['answer=own'] += ans == f'memory.{own}'
        by_group[g]['answer=original'] += ans == 'original'
        if kind != 'loc':
            by_group[g]['winner'] = by_group[g].get('winner', '') + ans.replace('memory.', 'm')[:2] + ' '
    print(kind, dict(c))
    if kind != 'loc':
        for g in sorted(by_group):
            b = by_group[g]
            print(f'  edits {g*10}-{g*10+9}: own score/threshold mean {b["own/thr"]:.2f}, answered by own {b["answer=own"]}, by original {b["answer=original"]}; {b["winner"]}')
