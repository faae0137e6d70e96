"""State: what the controller remembers and tells git. Record types (`records`), the SQLite store and its
migrations (`store`, `migrations`), git notes on commits and revert commits (`git_notes`, `git_revert`)."""
