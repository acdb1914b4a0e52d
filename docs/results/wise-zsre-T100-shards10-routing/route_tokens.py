"""Per-token routing distances of every memory of a saved WISE state, for the rewrite,
rephrased and NQ prompts of the first N ZsRE records (kedit generate --explain)."""
import json, subprocess, sys, os
data = json.load(open('../shared/data/zsre/zsre_mend_eval_portability_0-499.json'))
state, outp, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
kedit = os.environ.get('KEDIT', 'target/release/kedit')
out = open(outp, 'w')
for i, r in enumerate(data[:n]):
    for kind, prompt in [('rel', r['src'] + ' ' + r['alt']), ('gen', r['rephrase'] + ' ' + r['alt']), ('loc', r['loc'] + ' ' + r['loc_ans'])]:
        p = subprocess.run([kedit, 'generate', '--load', state, '--prompt=' + prompt,
                            '--max-new-tokens', '1', '--explain'], capture_output=True, text=True)
        ex = [json.loads(l[len('explain: '):]) for l in p.stdout.splitlines() if l.startswith('explain: ')]
        if not ex:
            print(i, kind, 'no explanation', p.stderr[-300:], file=sys.stderr); continue
        e = ex[0]
        row = e['rows'][0]
        out.write(json.dumps({'i': i, 'kind': kind, 'answer': row['answer'], 'scores': row['scores'],
                              'thresholds': e['memory_thresholds'], 'threshold': e['threshold'],
                              'dist': row['token_distances']}) + '\n')
        out.flush()
