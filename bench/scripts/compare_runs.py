"""Compare two run folders leaf by leaf: manifest.json and metrics.json (equal / differing /
missing leaves) and every file by sha256.  Used for issue 19 (reports and manifests before and
after the structure refactor): python bench/scripts/compare_runs.py RUN_BEFORE RUN_AFTER."""
import json, sys, hashlib
from pathlib import Path
A, B = (Path(a) for a in sys.argv[1:3])

def flat(x, p=""):
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            out.update(flat(v, f"{p}.{k}" if p else k))
        return out
    if isinstance(x, list):
        out = {}
        for i, v in enumerate(x):
            out.update(flat(v, f"{p}[{i}]"))
        return out
    return {p: x}

for name in ["manifest.json", "metrics.json"]:
    a, b = flat(json.loads((A/name).read_text())), flat(json.loads((B/name).read_text()))
    only_a = sorted(set(a) - set(b)); only_b = sorted(set(b) - set(a))
    diff = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    same = sum(1 for k in set(a) & set(b) if a[k] == b[k])
    print(f"== {name}: {same} equal leaves, {len(diff)} differ, {len(only_a)} only before, {len(only_b)} only after")
    for k in diff: print("  DIFF", k, repr(a[k])[:90], "|", repr(b[k])[:90])
    for k in only_a: print("  BEFORE-ONLY", k, repr(a[k])[:100])
    for k in only_b: print("  AFTER-ONLY", k, repr(b[k])[:100])
print("== files")
fa = {str(p.relative_to(A)) for p in A.rglob("*") if p.is_file()}
fb = {str(p.relative_to(B)) for p in B.rglob("*") if p.is_file()}
for f in sorted(fa | fb):
    if f in fa and f in fb:
        ha = hashlib.sha256((A/f).read_bytes()).hexdigest(); hb = hashlib.sha256((B/f).read_bytes()).hexdigest()
        print(f"  {'same' if ha == hb else 'DIFF'} {f}")
    else:
        print(f"  {'before-only' if f in fa else 'after-only'} {f}")
