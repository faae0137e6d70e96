"""Gate: the checks of a version run as a Ray job on the release's own resources (`runner`), with the
deadline for that job to start (`start`). Between `controller.plan` and `controller.rollout`."""
