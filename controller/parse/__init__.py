"""Parse + validate: release file bytes -> a `Release` or errors at file:line:column. Second step, after
`controller.source`; the safe YAML reader, the composed `Release` schema and the loader that places errors."""
