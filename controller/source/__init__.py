"""Source: the release files at a commit of git (never the work tree), the remote mirror, its credentials,
and commit signatures. First step of a reconcile; hands bytes to `controller.parse`."""
