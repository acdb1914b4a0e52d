import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
thr = rows[0]['memory_thresholds']
for j in range(len(thr)):
    own, other, loc = [], [], []
    for r in rows:
        s = dict((k, v) for k, v in r['scores'])[f'memory.{j}']
        if r['kind'] == 'loc':
            loc.append(s)
        elif r['i'] // 20 == j:
            own.append(s)
        else:
            other.append(s)
    def auc(a, b):
        return sum((x > y) + 0.5 * (x == y) for x in a for y in b) / (len(a) * len(b))
    med = lambda v: sorted(v)[len(v) // 2]
    print(f'memory.{j} (edits {20*j}-{20*j+19}): threshold {thr[j]:.1f}; median score own {med(own):.1f}, other edits {med(other):.1f}, NQ loc {med(loc):.1f}; '
          f'AUC own vs other edits {auc(own, other):.2f}, own vs loc {auc(own, loc):.2f}; loc above threshold {sum(x > thr[j] for x in loc)}/{len(loc)}')
