"""Plan: what changed between two revisions and what a change means (pure). Version ids and field classes
(`versions`), per-release field changes (`changes`) and their rendering for people (`report`)."""
