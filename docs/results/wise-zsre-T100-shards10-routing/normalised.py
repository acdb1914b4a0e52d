import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
n = len(rows[0]['memory_thresholds'])
sc = lambda r: [dict((k, v) for k, v in r['scores'])[f'memory.{j}'] for j in range(n)]
# a memory's scale: the mean score over its own edits' rewrite prompts (what it recorded at edit time, after the merge)
scale = [sum(sc(r)[j] for r in rows if r['kind'] == 'rel' and r['i'] // 20 == j) / 20 for j in range(n)]
print('scale', [round(s, 1) for s in scale])
for kind in ['rel', 'gen']:
    rs = [r for r in rows if r['kind'] == kind]
    raw = sum(max(range(n), key=lambda j: sc(r)[j]) == r['i'] // 20 for r in rs)
    norm = sum(max(range(n), key=lambda j: sc(r)[j] / scale[j]) == r['i'] // 20 for r in rs)
    print(kind, f'raw top-1 own {raw}/{len(rs)}, scale-normalised top-1 own {norm}/{len(rs)}')
