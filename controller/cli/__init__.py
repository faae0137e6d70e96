"""The `diffops` command line: the entry point (`main`), shared options (`common`), the gate and operator
commands (`gate`, `operate`) and what `status` / `history` show (`status_view`, pure)."""
