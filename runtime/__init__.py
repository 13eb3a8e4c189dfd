"""dafar.runtime: the thin on-device runtime (numpy plus one backend; issue 5; not built yet).

Importing this package must never load torch or tensorflow (a test checks it)."""
